"""Accuracy per group of questions (question type, subject, grade, ...), synced across processes by torchmetrics."""

from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics import Metric

# How an option's log-likelihood is compared with the others': summed over its tokens (favours short options),
# per token, or per character of the scored text (lm-evaluation-harness's acc_norm).
Normalisation = Literal["sum", "mean", "char"]
NORMALISATIONS: tuple[Normalisation, ...] = ("sum", "mean", "char")


class GroupedAccuracy(Metric):
    """Accuracy in each named group; a sample may belong to several groups (e.g. ``IMG`` and ``G1-6``).

    ``update(correct, groups)``: correct (B,) bool (or float in [0, 1]: an expected accuracy such as chance),
    groups a list of B lists of group names. Names not declared at construction are ignored, so a data set can tag
    more than a table shows.
    """

    full_state_update = False

    def __init__(self, groups: Sequence[str]) -> None:
        super().__init__()
        self.groups = list(groups)
        self._index = {name: i for i, name in enumerate(self.groups)}
        self.add_state("correct", torch.zeros(len(self.groups), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, groups: Sequence[Sequence[str]]) -> None:
        for is_correct, names in zip(correct.tolist(), groups, strict=True):
            for name in names:
                if name in self._index:
                    self.correct[self._index[name]] += float(is_correct)
                    self.total[self._index[name]] += 1

    def compute(self) -> dict[str, torch.Tensor]:
        """Group name -> accuracy in [0, 1]; NaN for a group with no samples."""
        accuracy = (self.correct / self.total).float()
        return {name: accuracy[i] for i, name in enumerate(self.groups)}


def choose_options(scores: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Index of the best-scoring option of each sample.

    scores (R,) and sample_index (R,) list every (sample, option) row, the options of a sample contiguous and
    samples numbered 0..S-1 in order; returns (S,) option indices within each sample.
    """
    counts = torch.bincount(sample_index).tolist()
    return torch.stack([options.argmax() for options in scores.split(counts)])


def option_scores(
    logprobs: torch.Tensor, rows: torch.Tensor, num_rows: int, normalisation: Normalisation, option_chars: torch.Tensor
) -> torch.Tensor:
    """Score of each (sample, option) row from its tokens' log-probabilities.

    logprobs (N,) and rows (N,) list every scored token and its row (``VisionLanguageModel.token_logprobs``);
    option_chars (R,) is each row's scored text length; returns (R,) with R = ``num_rows``.
    """
    total = logprobs.new_zeros(num_rows).index_add(0, rows, logprobs)  # (R,)
    if normalisation == "sum":
        return total
    if normalisation == "mean":
        return total / torch.bincount(rows, minlength=num_rows).clamp(min=1)
    if normalisation == "char":
        return total / option_chars.to(total).clamp(min=1)
    raise ValueError(f"unknown normalisation {normalisation!r}; choose from {NORMALISATIONS}")


def choices_by_normalisation(
    logprobs: torch.Tensor, rows: torch.Tensor, sample_index: torch.Tensor, option_chars: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Chosen option of each sample (S,) under every normalisation, from one pass's token log-probabilities."""
    num_rows = len(sample_index)
    return {
        name: choose_options(option_scores(logprobs, rows, num_rows, name, option_chars), sample_index)
        for name in NORMALISATIONS
    }


def chance_of(batch: dict) -> torch.Tensor:
    """Each sample's chance of being right by guessing, ``1 / options``: (S,) float, from its ``choices`` or, when
    options are scored, from how many candidate rows it has."""
    if "choices" in batch:
        counts = torch.tensor([len(choices) for choices in batch["choices"]])
    else:
        counts = torch.bincount(batch["sample_index"].cpu())
    return 1.0 / counts.double()
