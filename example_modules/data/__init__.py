"""DataModules on embedded data (digits, teacher, stdlib text) and local torchvision data sets."""

from example_modules.data.char_text import CharTextDataModule
from example_modules.data.digits import DigitsDataModule
from example_modules.data.teacher import TeacherDataModule
from example_modules.data.torchvision_data import TorchvisionDataModule

__all__ = ["CharTextDataModule", "DigitsDataModule", "TeacherDataModule", "TorchvisionDataModule"]
