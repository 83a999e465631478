"""Data: the built-in synthetic task, easy-VQA, ScienceQA, multi-turn conversations, collation into the model's
layout, prompt formats."""

from mma.data.base import EpochSampler, LengthGroupedSampler, MMADataModule
from mma.data.collate import VLMCollator
from mma.data.conversations import ConversationDataModule, ConversationSource
from mma.data.datamodule import SyntheticVQA, SyntheticVQADataModule
from mma.data.easyvqa import EasyVQA, EasyVQADataModule
from mma.data.scienceqa import ScienceQA, ScienceQADataModule

__all__ = [
    "ConversationDataModule",
    "ConversationSource",
    "EasyVQA",
    "EasyVQADataModule",
    "EpochSampler",
    "LengthGroupedSampler",
    "MMADataModule",
    "ScienceQA",
    "ScienceQADataModule",
    "SyntheticVQA",
    "SyntheticVQADataModule",
    "VLMCollator",
]
