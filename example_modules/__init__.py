"""Example LightningModules and DataModules for lightning_align (installed with the package).

Every module saves its hyper-parameters and takes ``width`` and ``depth``, so parametrizations can
re-instantiate it at a base size, and every callback of the suite works on it from YAML.
:class:`HFCausalLM` (Hugging Face GPT-2/Llama) and :class:`TimmClassifier` (timm) wrap the ecosystem's models;
``transformers``/``timm`` are imported only when they are built (``pip install lightning-align[hf]``).
"""

from example_modules.data import CharTextDataModule, DigitsDataModule, TeacherDataModule, TorchvisionDataModule
from example_modules.hf import HFCausalLM
from example_modules.mlp import MLP, ResMLP
from example_modules.resnet import ResNet
from example_modules.timm_models import TimmClassifier
from example_modules.transformer import GPT, ViT

__all__ = [
    "GPT",
    "HFCausalLM",
    "MLP",
    "CharTextDataModule",
    "DigitsDataModule",
    "ResMLP",
    "ResNet",
    "TeacherDataModule",
    "TimmClassifier",
    "TorchvisionDataModule",
    "ViT",
]
