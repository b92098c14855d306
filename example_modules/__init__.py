"""Example LightningModules and DataModules for lightning_align (installed with the package).

Every module saves its hyper-parameters and takes ``width`` and ``depth``, so parametrizations can
re-instantiate it at a base size, and every callback of the suite works on it from YAML.
"""

from example_modules.data import CharTextDataModule, DigitsDataModule, TeacherDataModule, TorchvisionDataModule
from example_modules.mlp import MLP, ResMLP
from example_modules.resnet import ResNet
from example_modules.transformer import GPT, ViT

__all__ = [
    "GPT",
    "MLP",
    "CharTextDataModule",
    "DigitsDataModule",
    "ResMLP",
    "ResNet",
    "TeacherDataModule",
    "TorchvisionDataModule",
    "ViT",
]
