"""What every mma data module shares: loaders that use the collator the module hands over, one typed description
of how evaluation is scored and reported, exact mid-epoch resume, and batches of one data source each for joint
training.

Data and module talk one way: ``MMAModule.setup`` gives the data module its collator (``set_collator``) and reads its
``evaluation()``; the data layer imports nothing from the module, the metrics or the evaluation code.
"""

import bisect
import logging
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mma.data.collate import VLMCollator
from mma.errors import ConfigError

log = logging.getLogger(__name__)


class EpochSampler(DistributedSampler):
    """Shuffles by (seed, epoch), so every epoch's order is known in advance, and can start part-way through.

    With ``num_replicas`` processes, rank ``r`` takes positions ``r, r + n, ...`` of that order (padded by
    repeating its start to a multiple of ``n``): together the ranks' batches of ``b`` are the single-process
    batches of ``n * b``. Being a ``DistributedSampler``, Lightning leaves it in place instead of wrapping it.
    Lightning calls ``set_epoch`` before each epoch; ``skip`` drops this rank's first indices of the next pass
    only (the batches a resumed run has already trained on).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.size, self.skip = size, 0

    def order(self) -> torch.Tensor:
        """This epoch's order of all ``size`` indices, before the ranks split it: (size,)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)

    def __iter__(self):
        order = self.order()
        order = torch.cat([order, order[: self.total_size - self.size]])
        skip, self.skip = self.skip, 0
        return iter(order[self.rank :: self.num_replicas][skip:].tolist())


class LengthGroupedSampler(EpochSampler):
    """An ``EpochSampler`` whose order batches samples of similar length together, so less of each batch is
    padding; a sample's loss does not change (positions ignore padding), only which samples share a batch.

    Each epoch, from the (seed, epoch) generator: shuffle; cut into mega-batches of ``mega_batches`` steps; sort
    each by length, longest first; cut into steps of ``batch_size`` x ``num_replicas`` samples; shuffle the
    steps, then put the one with the longest sample first (a run that runs out of memory does so at step 1)
    and keep an incomplete step last. The ranks stride through this order as through ``EpochSampler``'s, so each
    rank's batch of a step holds ``batch_size`` of that step's samples, and ``skip`` resumes the same way.

    ``lengths`` (size,) are any cheap per-sample lengths: mma's datasets report prompt + answer characters
    (``TextLengths``).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        seed: int,
        batch_size: int,
        mega_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(len(lengths), seed, shuffle=True, num_replicas=num_replicas, rank=rank)
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.mega_batches = batch_size, mega_batches

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(self.size, generator=generator)
        step = self.batch_size * self.num_replicas
        mega = [
            chunk[self.lengths[chunk].argsort(descending=True, stable=True)]
            for chunk in shuffled.split(step * self.mega_batches)
        ]
        steps = torch.cat(mega).split(step)
        full = len(steps) - int(len(steps[-1]) < step)  # an incomplete step stays last
        order = torch.randperm(full, generator=generator).tolist()
        if order:
            longest = max(order, key=lambda i: int(self.lengths[steps[i][0]]))  # sorted: its first is longest
            order.remove(longest)
            order.insert(0, longest)
        return torch.cat([steps[i] for i in order] + list(steps[full:]))


class LengthSortedSampler(EpochSampler):
    """Evaluation order, longest sample first: neighbours are of similar length, so batches hold little padding,
    and a batch that runs out of memory does so at the start. Scores do not depend on the order (records carry
    their sample ids); every process evaluates the whole set, as with the in-order ``EpochSampler``."""

    def __init__(self, lengths: Sequence[int]) -> None:
        super().__init__(len(lengths), seed=0, shuffle=False)
        self.lengths = torch.as_tensor(lengths)

    def order(self) -> torch.Tensor:
        return self.lengths.argsort(descending=True, stable=True)


class LengthBudgetBatchSampler(Sampler[list[int]]):
    """Evaluation batches in ``LengthSortedSampler``'s order, each holding as many samples as fit ``budget``
    counted as samples x the batch's longest length (one at least): long samples go few to a batch, short ones
    many. A batch's padded size (samples x longest) never exceeds the budget unless it holds one sample, so
    memory is bounded by the budget while short samples still fill wide matrix products. Every process gets every
    sample once (no distributed sharding, no drop_last), as with ``LengthSortedSampler``."""

    def __init__(self, lengths: Sequence[int], budget: float) -> None:
        self.batches: list[list[int]] = []
        for index in LengthSortedSampler(lengths).order().tolist():
            if not self.batches or (len(self.batches[-1]) + 1) * lengths[self.batches[-1][0]] > budget:
                self.batches.append([])
            self.batches[-1].append(index)

    @classmethod
    def median_sized(cls, lengths: Sequence[int], batch_size: int) -> "LengthBudgetBatchSampler":
        """Batches of ``batch_size`` samples of the median length (``lengths`` not empty): evaluation's."""
        return cls(lengths, batch_size * statistics.median(lengths))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@runtime_checkable
class TextLengths(Protocol):
    """A dataset that reports every sample's length without loading it, for length-grouped batches: the
    characters of the row it becomes (``row_chars``). A proxy for the token count: a tokenizer gives about a
    token per 3-4 characters, and the visual tokens an image sample adds are left out."""

    def text_lengths(self) -> list[int]: ...


def row_chars(prompt: str, answer: str | None = None, candidates: Sequence[str] = ()) -> int:
    """Characters of a sample's row: the prompt and its answer, or every candidate when options are scored (a
    scoring row holds the prompt once, then each candidate after a separator)."""
    return len(prompt) + len(answer or "") + sum(len(candidate) + 1 for candidate in candidates)


class JointDataset(Dataset):
    """Datasets of several sources end to end; every sample is labelled with its source (``"source"``), which
    decides the parameters its batch trains (``mma.adapters.base.source_parameters``)."""

    def __init__(self, parts: dict[str, Dataset]) -> None:
        self.names, self.parts = list(parts), list(parts.values())
        self.lengths = torch.tensor([len(part) for part in self.parts])
        self.ends = self.lengths.cumsum(0).tolist()

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, index: int) -> dict:
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        return {**self.parts[part][index - start], "source": self.names[part]}

    def sources(self) -> list[int]:
        """The part number of every index."""
        return torch.arange(len(self.parts)).repeat_interleave(self.lengths).tolist()


def text_lengths(dataset: Dataset) -> list[int] | None:
    """Every sample's ``TextLengths`` length (a ``JointDataset``'s from its parts); None when not reported."""
    if isinstance(dataset, JointDataset):
        parts = [text_lengths(part) for part in dataset.parts]
        return None if any(part is None for part in parts) else [n for part in parts for n in part]
    return dataset.text_lengths() if isinstance(dataset, TextLengths) else None


class SourceBatchSampler(Sampler[list[int]]):
    """Batches that each hold one source: walks ``sampler``'s order, filling one batch per source, and yields a
    batch when it is full; an epoch's unfilled remainders are dropped. ``skip`` drops the first batches of the
    next pass only (mid-epoch resume)."""

    def __init__(self, sampler: EpochSampler, sources: list[int], batch_size: int) -> None:
        self.sampler, self.sources, self.batch_size = sampler, sources, batch_size
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        counts = torch.bincount(torch.tensor(self.sources)[list(self.sampler)]).tolist()
        return sum(count // self.batch_size for count in counts)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        filling: dict[int, list[int]] = {}
        for index in self.sampler:
            batch = filling.setdefault(self.sources[index], [])
            batch.append(index)
            if len(batch) == self.batch_size:
                del filling[self.sources[index]]
                if skip:
                    skip -= 1
                else:
                    yield batch


@dataclass(frozen=True)
class Evaluation:
    """How a data module's evaluation samples are scored and reported.

    Args:
        groups: accuracy groups, in table order; a sample's ``groups`` names the ones it counts in.
        headline: the group that holds every sample: validation's ``val/acc``.
        test_names: one name per test loader (``test``, ``blind``, ...): metric prefixes and report names.
        unparseable: a generated answer that names no option counts as ``wrong``, or (LaVIN) as a ``random`` one.
        seed: seed of the random fallback.
        score_normalisation: how scored options compare: ``sum`` of log-probabilities, ``mean`` per token, or per
            ``char`` of the scored text; the overall accuracy under each is logged too (``test/all@mean``, ...).
        answer_prefix: text every generated answer starts with, given after the prompt and read in front of the
            generated text (MemVP's ``The answer is``); empty: none.
        unavailable: groups the data cannot fill (reports mark them ``n/a``).
        report: the report the evaluation code writes for each test loader (``scienceqa``), or None.
        metadata: what the report records about the run's data settings.
    """

    groups: tuple[str, ...] = ("all",)
    headline: str = "all"
    test_names: tuple[str, ...] = ("test",)
    unparseable: Literal["wrong", "random"] = "wrong"
    seed: int = 0
    score_normalisation: Literal["sum", "mean", "char"] = "sum"
    answer_prefix: str = ""
    unavailable: tuple[str, ...] = ()
    report: str | None = None
    metadata: dict = field(default_factory=dict)


class MMADataModule(L.LightningDataModule):
    """Base of mma's data modules: batches are laid out by the collator the module hands over (``set_collator``),
    and the position in the training epoch is saved in checkpoints so a resumed run sees the same batches.

    ``group_by_length`` batches training samples of similar length together (``LengthGroupedSampler``) and
    evaluates longest first in batches sized by length (``LengthBudgetBatchSampler``) when the dataset reports
    lengths (``TextLengths``);
    otherwise, and when off, training batches are drawn at random and evaluation runs in dataset order.
    """

    def __init__(
        self, batch_size: int, eval_batch_size: int, num_workers: int, seed: int, group_by_length: bool = True
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ConfigError(f"data setting {name}={value} must be at least 1")
        if num_workers < 0:
            raise ConfigError(f"data setting num_workers={num_workers} must be at least 0")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.group_by_length = num_workers, seed, group_by_length
        self.collator: VLMCollator | None = None
        # Whether ``test`` also runs the data's controls (the blind control over blank pictures); ``mma demo`` turns
        # them off for the untuned model, whose controls say nothing.
        self.with_controls = True
        self._resume_batches = 0

    def evaluation(self) -> Evaluation:
        """How this data's evaluation is scored and reported (one accuracy over every sample by default)."""
        return Evaluation(seed=self.seed)

    def set_collator(self, collator: VLMCollator) -> None:
        """The model's collator, built from its tokenizer and sequence layout (``MMAModule.setup`` calls this)."""
        self.collator = collator

    def train_loader(self, dataset: Dataset) -> DataLoader:
        """Shuffled training batches; a ``JointDataset`` gives batches of one source each."""
        sampler = self.train_sampler(dataset, self.trainer.world_size, self.trainer.global_rank)
        resume, self._resume_batches = self._resume_batches, 0
        if isinstance(dataset, JointDataset):
            batches = SourceBatchSampler(sampler, dataset.sources(), self.batch_size)
            batches.skip = resume % len(batches)
            return self._loader(dataset, batch_sampler=batches)
        sampler.skip = (resume * self.batch_size) % len(sampler)
        return self._loader(dataset, batch_size=self.batch_size, sampler=sampler)

    def train_sampler(self, dataset: Dataset, world: int, rank: int) -> EpochSampler:
        """This rank's training order: length-grouped when ``group_by_length`` and the dataset reports lengths."""
        lengths = text_lengths(dataset) if self.group_by_length else None
        if self.group_by_length and lengths is None:
            log.warning("%s reports no text_lengths(): batches are not grouped by length", type(dataset).__name__)
        if lengths is None:
            return EpochSampler(len(dataset), self.seed, num_replicas=world, rank=rank)
        return LengthGroupedSampler(lengths, self.seed, self.batch_size, num_replicas=world, rank=rank)

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """Evaluation batches: with ``group_by_length``, when the dataset reports lengths, longest first and sized
        to ``eval_batch_size`` samples of the median length (``LengthBudgetBatchSampler``); otherwise
        ``eval_batch_size`` samples a batch in dataset order."""
        lengths = text_lengths(dataset) if self.group_by_length else None
        if not lengths:  # not reported, or an empty set (which has no median)
            sampler = EpochSampler(len(dataset), self.seed, shuffle=False)
            return self._loader(dataset, batch_size=self.eval_batch_size, sampler=sampler)
        return self._loader(dataset, batch_sampler=LengthBudgetBatchSampler.median_sized(lengths, self.eval_batch_size))

    def _loader(self, dataset: Dataset, **batching: int | Sampler) -> DataLoader:
        # An own generator: creating the iterator must not draw from the global RNG (dropout's), or a resumed
        # run would diverge from an uninterrupted one.
        if self.collator is None:
            raise ConfigError(f"{type(self).__name__} has no collator: MMAModule.setup hands it the model's")
        return DataLoader(
            dataset,
            **batching,
            num_workers=self.num_workers,
            collate_fn=self.collator,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> dict:
        """Training batches already consumed in the current epoch (saved in every checkpoint)."""
        return {"train_batches_done": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_batches = state["train_batches_done"]
