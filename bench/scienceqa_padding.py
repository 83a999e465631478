"""Padding on ScienceQA's length distribution: every row padded to max_length (LaVIN's loader), padded to the
batch's longest row (mma's collator), and length-grouped batches (``LengthGroupedSampler``) padded to their
longest row, as training steps of the recipe's model with LaVIN adapters.

Run through ``python bench/train_step.py --data scienceqa [--config ...] [--steps 6]``. The samples are every
problem of the ScienceQA sample (150, all splits) as LaVIN trains on them: QCM-ALE prompts answered with the
letter, lecture and explanation, tokenised by the recipe's tokenizer; a problem with a picture gets random pixels
(the sample lacks most train/val pictures, and only the sequence lengths matter here). The epoch's padding share
is exact for each scheme; tokens/s, GFLOP/s, MFU and peak memory are measured on ``steps`` batches spread evenly
over each scheme's epoch, the schemes alternating.
"""

import statistics

import torch
from measure import HEADER, StepStats, matmul_gflops
from train_step import BATCH, adamw, build, compute_dtype, measured_step, time_train_step

from mma.data import ScienceQADataModule
from mma.data.base import EpochSampler, LengthGroupedSampler
from mma.layout import IGNORE_INDEX, SequenceLayout
from mma.throughput import real_tokens

MAX_LENGTH, GROUPED, LONGEST = "pad to max_length (LaVIN)", "length-grouped", "pad to batch longest"


def scienceqa_samples(root: str, pixels: torch.Tensor) -> list[dict]:
    """Every problem of every split as a LaVIN training sample; ``pixels`` stand in for each picture."""
    data = ScienceQADataModule(root=root, prompt_format="QCM-ALE", answer_style="letter", missing_images="text_only")
    problems, splits = data.problems()
    samples = {}
    for split in splits:
        dataset = data.dataset(split, "train")
        for sample in map(dataset.__getitem__, range(len(dataset))):
            picture = pixels if problems[sample["pid"]].get("image") else None
            samples.setdefault(sample["pid"], {**sample, "image": picture})
    return list(samples.values())


def chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def epoch_padding(batches: list[list[int]], tokens: list[int], width: int | None = None) -> float:
    """Padding share of an epoch of ``batches`` whose rows are padded to ``width`` (None: each batch's longest)."""
    real = sum(tokens[i] for batch in batches for i in batch)
    positions = sum(len(batch) * (width or max(tokens[i] for i in batch)) for batch in batches)
    return 1 - real / positions


def pad_to(batch: dict, width: int, layout: SequenceLayout, pad_id: int) -> dict:
    """``batch`` left-padded to ``width`` positions, after the modality slot: LaVIN's fixed-length rows."""
    at, extra = int(layout.modality_token), width - batch["input_ids"].shape[1]

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t[:, :at], t.new_full((t.shape[0], extra), value), t[:, at:]], dim=1)

    padded = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {**batch, **{key: widen(batch[key], value) for key, value in padded.items()}}


def describe(samples: list[dict], tokens: list[int], schemes: dict, max_length: int) -> None:
    pictures = sum(s["image"] is not None for s in samples)
    deciles = statistics.quantiles(tokens, n=10)
    cut = sum(n >= max_length for n in tokens)
    print(f"ScienceQA sample: {len(samples)} problems ({pictures} with a picture), QCM-ALE, letter answers")
    print(f"tokens per sample: median {statistics.median(tokens):.0f}, p10 {deciles[0]:.0f}, p90 {deciles[-1]:.0f};")
    print(f"  {cut} cut at max_length {max_length}; batch {BATCH}, {len(schemes[GROUPED])} batches an epoch")
    for name, batches in schemes.items():
        share = epoch_padding(batches, tokens, max_length if name == MAX_LENGTH else None)
        print(f"  epoch padding share, {name}: {100 * share:.1f}%")


def compare_padding(config: str, root: str, steps: int) -> None:
    """Print the length distribution, each scheme's padding share, and measured steps of each scheme."""
    model, collator, precision = build(config, "lavin")
    pixels = torch.rand(3, *model.vit.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    samples = scienceqa_samples(root, pixels)
    tokens = [real_tokens(collator([sample])) for sample in samples]
    chars = [len(s["prompt"]) + len(s["answer"]) for s in samples]  # what the data modules group by
    shuffled = chunks(list(EpochSampler(len(samples), seed=0)), BATCH)
    grouped = chunks(list(LengthGroupedSampler(chars, seed=0, batch_size=BATCH)), BATCH)
    schemes = {MAX_LENGTH: shuffled, LONGEST: shuffled, GROUPED: grouped}
    describe(samples, tokens, schemes, collator.max_length)

    peak = matmul_gflops(compute_dtype(precision), next(model.parameters()).device)
    print(f"matmul throughput (1024^2, {compute_dtype(precision)}): {peak:.1f} GFLOP/s; {steps} steps each:")
    optimizer, stats = adamw(model), {name: StepStats() for name in schemes}
    model.train()
    time_train_step(model, collator([samples[i] for i in grouped[0]]), optimizer, precision)  # warm-up
    picks = torch.linspace(0, len(grouped) - 1, steps).round().long().tolist()
    for k in picks:
        for name, batches in schemes.items():
            batch = collator([samples[i] for i in batches[k]])
            if name == MAX_LENGTH:
                batch = pad_to(batch, collator.max_length, model.layout, collator.tokenizer.pad_token_id)
            measured_step(model, batch, optimizer, precision, stats[name])
    print(f"{'':>26}  {HEADER}")
    for name, stat in stats.items():
        print(f"{name:>26}: {stat.line(peak)}")
    base = stats[MAX_LENGTH].tokens_per_second
    for name in (LONGEST, GROUPED):
        print(f"real tokens/s, {name} / {MAX_LENGTH}: {stats[name].tokens_per_second / base:.2f}x")
