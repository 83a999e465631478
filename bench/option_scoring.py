"""Option scoring, each prompt once against one sequence per option: seconds per problem and their ratio.

    python bench/option_scoring.py [--config recipes/scienceqa/demo-cpu.yaml] [--tiny] [--problems 16]
                                   [--options 4] [--batch 8] [--threads 1] [--repeats 3] [overrides]

Takes the first ``--problems`` problems of the recipe's ScienceQA test split (prompts and pictures as the recipe
makes them; each problem's candidates cycled to ``--options``) and scores them, ``--batch`` problems at a time,
(a) in the scoring layout (``VisionLanguageModel.option_logprobs``: prompt and picture once, options after it)
and (b) as one sequence per option (``token_logprobs`` on the prompt + option rows: the layout used before). Each
timing covers collation and the forward pass; the two alternate so machine drift hits both alike; also checks
that both give the same scores. ``--tiny`` swaps in the test suite's tiny backbones (LLaMA hidden 64, 2 layers).
Run it alone: another busy process on two cores makes the absolute numbers meaningless (the ratio less so).
"""

import argparse
import json
import statistics
import time

import torch

from mma.recipe import config_cli

TINY_LLM = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=4096,
)
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TINY = [
    *("--model.model.llm.path", "null", "--model.model.llm.config", json.dumps(TINY_LLM)),
    *("--model.model.vit.overrides", json.dumps(TINY_VIT)),
    *("--model.max_length", "4096"),  # its byte tokenizer makes ScienceQA prompts about 1,400 tokens long
]


def problems(data, count: int, options: int) -> list[dict]:
    """The first ``count`` scored problems of the test split, candidates cycled to ``options`` each."""
    dataset = data.dataset(data.hparams.test_split, "score")
    chosen = [dataset[i] for i in range(min(count, len(dataset)))]
    return [{**p, "candidates": [p["candidates"][k % len(p["candidates"])] for k in range(options)]} for p in chosen]


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


def compare(model, collator, batches: list[list[dict]], repeats: int) -> tuple[dict, dict]:
    """Seconds of each round and the last round's scores (R,), per method; the first round warms up."""
    times: dict[str, list[float]] = {"prompt once": [], "row per option": []}
    scores: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for name, score in (("prompt once", packed), ("row per option", per_option)):
                start = time.perf_counter()
                scores[name] = torch.cat([score(model, collator, batch) for batch in batches])
                times[name].append(time.perf_counter() - start)
    return {name: values[1:] for name, values in times.items()}, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/scienceqa/demo-cpu.yaml")
    parser.add_argument("--tiny", action="store_true", help="the tiny test backbones instead of the recipe's")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--options", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)

    cli = config_cli(args.config, [*(TINY if args.tiny else []), *overrides])
    cli.model.configure_model()
    model, collator = cli.model.model.eval(), cli.model.make_collator()
    chosen = problems(cli.datamodule, args.problems, args.options)
    batches = [chosen[i : i + args.batch] for i in range(0, len(chosen), args.batch)]
    times, scores = compare(model, collator, batches, args.repeats)

    pictures = sum(p["image"] is not None for p in chosen)
    backbones = "tiny backbones" if args.tiny else "the recipe's backbones"
    print(f"{args.config}, {backbones}: {len(chosen)} problems ({pictures} with a picture) x {args.options} options,")
    print(f"  {args.batch} problems a batch, {args.threads} thread(s), median of {args.repeats} rounds")
    per_problem = {name: statistics.median(values) / len(chosen) for name, values in times.items()}
    for name, seconds in per_problem.items():
        print(f"  {name:>14}: {1000 * seconds:.1f} ms/problem")
    print(
        f"  speed-up, prompt once / row per option: {per_problem['row per option'] / per_problem['prompt once']:.2f}x"
    )
    gap = (scores["prompt once"] - scores["row per option"]).abs().max().item()
    print(f"  largest score difference: {gap:.2e}")


if __name__ == "__main__":
    main()
