"""ScienceQA option-scoring evaluation before and after #17: seconds per problem and their ratios.

    python bench/option_scoring.py [--config recipes/scienceqa/demo-cpu.yaml] [--tiny] [--problems 0]
                                   [--options 0] [--batch 8] [--threads 2] [--repeats 2] [overrides]

Takes the recipe's ScienceQA test problems (all of them, or the first ``--problems``; prompts and pictures as the
recipe makes them; each with its own options, or its candidates cycled to ``--options``) and scores them in
batches of ``--batch`` problems three ways:
(a) one sequence per option (``token_logprobs`` on prompt + option rows), batches in dataset order: the evaluation
    before #17;
(b) the scoring layout (``VisionLanguageModel.option_logprobs``: prompt and picture once, options after it),
    batches in dataset order;
(c) the scoring layout, longest first in batches of ``--batch`` problems of the median length
    (``LengthBudgetBatchSampler``): what ``mma test`` does now.
Each timing covers collation and the forward pass; the three alternate so machine drift hits them alike; also
checks that all give the same scores. ``--tiny`` swaps in the test suite's tiny backbones (LLaMA hidden 64,
2 layers). Run it alone: another busy process on two cores makes the absolute numbers meaningless.
"""

import argparse
import json
import statistics
import time

import torch

from mma.backbones.tiny import TINY_LLM, TINY_VIT
from mma.data.base import LengthBudgetBatchSampler, row_chars
from mma.recipe import config_cli

TINY = [
    *(
        "--model.model.llm.path",
        "null",
        "--model.model.llm.config",
        json.dumps(TINY_LLM | {"max_position_embeddings": 4096}),
    ),
    *("--model.model.vit.path", "null", "--model.model.vit.name", "vit_tiny_patch16_224"),
    *("--model.model.vit.image_size", "null", "--model.model.vit.overrides", json.dumps(TINY_VIT)),
    *("--model.max_length", "4096"),  # its byte tokenizer makes ScienceQA prompts about 1,400 tokens long
]


def problems(data, count: int, options: int, batch: int) -> tuple[list[dict], list[list[int]]]:
    """The first ``count`` (0: all) scored problems of the test split, candidates cycled to ``options`` (0: their
    own), and the batches ``mma test`` makes of them (longest first, ``batch`` problems of the median length)."""
    dataset = data.dataset(data.hparams.test_split, "score")
    chosen = [dataset[i] for i in range(min(count or len(dataset), len(dataset)))]
    if options:
        chosen = [
            {**p, "candidates": [p["candidates"][k % len(p["candidates"])] for k in range(options)]} for p in chosen
        ]
    lengths = [row_chars(p["prompt"], candidates=p["candidates"]) for p in chosen]
    return chosen, list(LengthBudgetBatchSampler.median_sized(lengths, batch))


def one_row_per_option(problems: list[dict]) -> list[dict]:
    """Each (problem, option) as a sample answered by the option."""
    return [{"prompt": p["prompt"], "image": p["image"], "answer": c} for p in problems for c in p["candidates"]]


def row_scores(logprobs: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return logprobs.new_zeros(num_rows).index_add(0, rows, logprobs)


def packed(model, collator, batch: list[dict]) -> torch.Tensor:
    """Option scores (R,) in the scoring layout."""
    collated = collator(batch)
    return row_scores(*model.option_logprobs(collated), len(collated["sample_index"]))


def per_option(model, collator, batch: list[dict]) -> torch.Tensor:
    """Option scores (R,) from one sequence per option."""
    rows = one_row_per_option(batch)
    return row_scores(*model.token_logprobs(collator(rows)), len(rows))


def scores_in_dataset_order(problems: list[dict], batches: list[list[int]], scores: torch.Tensor) -> torch.Tensor:
    """Option scores (R,) computed batch by batch, put back in dataset order."""
    order = [i for batch in batches for i in batch]
    per_problem = scores.split([len(problems[i]["candidates"]) for i in order])
    back = dict(zip(order, per_problem, strict=True))
    return torch.cat([back[i] for i in range(len(problems))])


def compare(model, collator, chosen: list[dict], budgeted: list[list[int]], batch: int, repeats: int):
    """Seconds of each round and the scores (R,) in dataset order, per way; the first round warms up."""
    in_order = [list(range(i, min(i + batch, len(chosen)))) for i in range(0, len(chosen), batch)]
    ways = {
        "row per option, in order": (per_option, in_order),
        "prompt once, in order": (packed, in_order),
        "prompt once, longest first": (packed, budgeted),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    scores: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for name, (score, batches) in ways.items():
                start = time.perf_counter()
                found = [score(model, collator, [chosen[i] for i in indices]) for indices in batches]
                times[name].append(time.perf_counter() - start)
                scores[name] = scores_in_dataset_order(chosen, batches, torch.cat(found))
    return {name: values[1:] for name, values in times.items()}, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/scienceqa/demo-cpu.yaml")
    parser.add_argument("--tiny", action="store_true", help="the tiny test backbones instead of the recipe's")
    parser.add_argument("--problems", type=int, default=0, help="first N test problems (default: all)")
    parser.add_argument("--options", type=int, default=0, help="cycle candidates to N (default: their own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)

    cli = config_cli(args.config, [*(TINY if args.tiny else []), *overrides])
    cli.model.configure_model()
    model, collator = cli.model.model.eval(), cli.model.make_collator()
    chosen, budgeted = problems(cli.datamodule, args.problems, args.options, args.batch)
    times, scores = compare(model, collator, chosen, budgeted, args.batch, args.repeats)

    pictures = sum(p["image"] is not None for p in chosen)
    options = sum(len(p["candidates"]) for p in chosen)
    backbones = "tiny backbones" if args.tiny else "the recipe's backbones"
    print(f"{args.config}, {backbones}: {len(chosen)} test problems ({pictures} with a picture), {options} options,")
    print(
        f"  {args.batch} problems a batch ({len(budgeted)} batches sized by length), {args.threads} thread(s), "
        f"median of {args.repeats} rounds"
    )
    per_problem = {name: statistics.median(values) / len(chosen) for name, values in times.items()}
    before = per_problem["row per option, in order"]
    for name, seconds in per_problem.items():
        print(f"  {name:>26}: {1000 * seconds:7.1f} ms/problem, {before / seconds:.2f}x")
    reference = scores["row per option, in order"]
    gap = max((found - reference).abs().max().item() for found in scores.values())
    print(f"  largest score difference: {gap:.2e}")


if __name__ == "__main__":
    main()
