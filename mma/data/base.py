"""What every mma data module shares: loaders that use the model's collator, and exact mid-epoch resume."""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """Shuffles by (seed, epoch), so every epoch's order is known in advance, and can start part-way through.

    Lightning calls ``set_epoch`` before each epoch; ``skip`` drops the first indices of the next pass only
    (the batches a resumed run has already trained on).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        skip, self.skip = self.skip, 0
        return iter(order[skip:].tolist())


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
        sampler = EpochSampler(len(dataset), self.seed)
        sampler.skip = (self._resume_batches * self.batch_size) % len(dataset)
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
