"""What every mma data module shares: loaders that use the model's collator, and exact mid-epoch resume."""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


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

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        order = torch.cat([order, order[: self.total_size - self.size]])
        skip, self.skip = self.skip, 0
        return iter(order[self.rank :: self.num_replicas][skip:].tolist())


class MMADataModule(L.LightningDataModule):
    """Base of mma's data modules: batches are laid out by the model's own collator (``MMAModule.collator``),
    and the position in the training epoch is saved in checkpoints so a resumed run sees the same batches."""

    evaluation_groups: tuple[str, ...] = ("all",)
    overall_group = "all"  # the group that holds every sample: validation's headline accuracy
    test_names: tuple[str, ...] = ("test",)

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self._resume_batches = 0

    def train_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = EpochSampler(len(dataset), self.seed, num_replicas=world, rank=rank)
        sampler.skip = (self._resume_batches * self.batch_size) % len(sampler)
        self._resume_batches = 0
        return self._loader(dataset, self.batch_size, sampler)

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        return self._loader(dataset, self.eval_batch_size, EpochSampler(len(dataset), self.seed, shuffle=False))

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler) -> DataLoader:
        # An own generator: creating the iterator must not draw from the global RNG (dropout's), or a resumed
        # run would diverge from an uninterrupted one.
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.trainer.lightning_module.collator,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> dict:
        """Training batches already consumed in the current epoch (saved in every checkpoint)."""
        return {"train_batches_done": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume_batches = state["train_batches_done"]
