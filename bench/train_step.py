"""Training-step and generation cost of adapters on the demo backbones, as ratios measured side by side.

    python bench/train_step.py [--config recipes/demo.yaml] [--threads 2] [--steps 6]

Builds the demo recipe's backbones twice, once with LaVIN MMA adapters and once with only the projector trainable
(`none`), and times, alternating between them so drift hits both alike:
  - one optimizer step at batch 4 x 256 tokens (forward, backward, AdamW) under the recipe's precision;
  - greedy generation with KV cache (tokens per second).
Run it alone: with two cores another busy process slows torch by an order of magnitude.
"""

import argparse
import statistics
import time

import torch

from mma.cli import config_cli

BATCH, TOKENS, NEW_TOKENS = 4, 256, 32


def build(config: str, adapter: str):
    module = config_cli(
        config, ["--model.model.adapter", adapter, "--model.model.adapter_config", "{}", "--model.max_length", "512"]
    ).model
    module.configure_model()
    return module.model, module.collator


def samples(collator, tokens: int) -> list[dict]:
    """Image questions whose prompts pad each sequence to about ``tokens`` tokens."""
    from PIL import Image

    filler = "Look carefully at every part of the picture before answering. " * 64
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    fixed = len(
        collator(  # tokens outside the filler
            [{"prompt": "", "answer": "The answer is red.", "image": image}]
        )["input_ids"][0]
    )
    words = collator.tokenizer(filler, add_special_tokens=False).input_ids[: tokens - fixed]
    prompt = collator.tokenizer.decode(words)
    return [{"prompt": prompt, "answer": "The answer is red.", "image": image} for _ in range(BATCH)]


def time_train_step(model, batch, optimizer) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_generation(model, batch) -> float:
    """Seconds per generated token (batch rows x steps); every run decodes NEW_TOKENS steps."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(batch, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    return (time.perf_counter() - start) / (BATCH * NEW_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/demo.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    runs = {}
    for adapter in ("none", "lavin"):
        model, collator = build(args.config, adapter)
        train_batch = collator(samples(collator, TOKENS))
        prompt_batch = collator([{**s, "answer": None} for s in samples(collator, TOKENS // 2)])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        runs[adapter] = dict(model=model, train=train_batch, prompt=prompt_batch, opt=optimizer, step=[], gen=[])
    print(f"batch {BATCH} x {train_batch['input_ids'].shape[1]} tokens, {args.threads} threads, bf16 autocast")

    for run in runs.values():  # warm-up: allocator, autocast caches, first-call overheads
        run["model"].train()
        time_train_step(run["model"], run["train"], run["opt"])
    for _ in range(args.steps):
        for run in runs.values():
            run["model"].train()
            run["step"].append(time_train_step(run["model"], run["train"], run["opt"]))
            run["model"].eval()
            run["gen"].append(time_generation(run["model"], run["prompt"]))

    step = {name: statistics.median(run["step"]) for name, run in runs.items()}
    gen = {name: 1 / statistics.median(run["gen"]) for name, run in runs.items()}
    for name in runs:
        print(f"{name:>6}: train step {step[name]:.3f} s   generation {gen[name]:.1f} tokens/s")
    print(f"training step, MMA / projector-only: {step['lavin'] / step['none']:.3f}x  (target <= 1.10x)")
    print(f"generation tokens/s, MMA / no adapters: {gen['lavin'] / gen['none']:.3f}x  (target >= 0.90x)")


if __name__ == "__main__":
    main()
