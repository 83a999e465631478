"""Data: the built-in synthetic task, collation into the model's layout, prompt formats."""

from mma.data.base import EpochSampler, MMADataModule
from mma.data.collate import VLMCollator
from mma.data.datamodule import SyntheticVQA, SyntheticVQADataModule
from mma.data.scienceqa import ScienceQA, ScienceQADataModule

__all__ = [
    "EpochSampler",
    "MMADataModule",
    "ScienceQA",
    "ScienceQADataModule",
    "SyntheticVQA",
    "SyntheticVQADataModule",
    "VLMCollator",
]
