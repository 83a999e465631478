"""Training-step and generation cost of adapters on the demo backbones, as ratios measured side by side.

    python bench/train_step.py [--config recipes/demo.yaml] [--threads 2] [--steps 6] [--data scienceqa]
    python bench/train_step.py --config recipes/easy-vqa-demo.yaml   # make demo's DINOv2 configuration

Builds the recipe's backbones once per method: only the projector trainable (`none`, the floor), LaVIN MMA
adapters, LLaMA-Adapter V2 and MemVP (each with its default settings, but MemVP's memory sized to the recipe's visual
tokens as the authors size theirs: 320 slots for 256 tokens, so 1.25x), and times, alternating between them so drift
hits all alike:
  - one optimizer step at batch 4 x 256 tokens (forward, backward, AdamW) under the recipe's precision (the
    Trainer's own forward context: autocast for ``bf16-mixed``, none for ``32-true``);
  - greedy generation with KV cache (tokens per second).
Each step also reports what it achieves (``bench/measure.py``): real (non-padding) tokens per second, the padding
share, model GFLOP/s (``mma.throughput``: real tokens only) and MFU against the matmul throughput measured at
start in the recipe's compute dtype, and peak memory (CUDA: allocated tensors; CPU: the process's resident set).
``--data scienceqa`` instead compares, on the ScienceQA sample's length distribution, padding every row to
max_length (LaVIN) with padding to the batch's longest row and with length-grouped batches
(``bench/scienceqa_padding.py``).
Then, on the text-only LLM, mma's adaption prompts against peft's (``AdaptionPromptConfig``) with the same
settings: 10-token prompts in every layer, one ungated scalar per layer, no bias/scale or norms.
Run it alone: with two cores another busy process slows torch by an order of magnitude.
"""

import argparse
import json
import math
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import Precision
from measure import HEADER, StepStats, matmul_gflops, peak_memory_mb, reset_peak_memory  # bench/ is on sys.path
from peft import AdaptionPromptConfig, get_peft_model

from mma.adapters import get_adapter
from mma.optim import OptimizerConfig, make_optimizer
from mma.recipe import config_cli

BATCH, TOKENS, NEW_TOKENS, SCORED = 4, 256, 32, 16
ADAPTERS = ("none", "lavin", "llama-adapter-v2", "memvp")
TARGETS = {"lavin": 1.10, "llama-adapter-v2": 1.25, "memvp": 1.05}
MEMORY_PER_TOKEN = 320 / 256  # MemVP-7B: 256 patch tokens in 320 memory slots


def build(config: str, adapter: str, settings: dict | None = None):
    """The recipe's model with ``adapter`` attached, its collator, and its Trainer's precision plugin."""
    spec = {"class_path": get_adapter(adapter).settings.__name__, "init_args": settings or {}}
    options = ["--model.model.adapter", json.dumps(spec)]
    cli = config_cli(config, [*options, "--model.max_length", "512"])
    cli.model.configure_model()
    return cli.model.model, cli.model.make_collator(), cli.trainer.precision_plugin


def build_all(config: str, methods: list[str] | tuple[str, ...]) -> dict[str, tuple]:
    """``build`` for each method with its default settings, but MemVP's memory sized to the recipe's visual tokens
    as the authors size theirs (``MEMORY_PER_TOKEN``)."""
    built, slots = {}, None
    for method in sorted(methods, key=lambda m: m == "memvp"):  # MemVP last: another model counts its tokens
        settings = {"memory_slots": slots} if method == "memvp" and slots else None
        built[method] = build(config, method, settings)
        slots = math.ceil(MEMORY_PER_TOKEN * built[method][0].num_visual_tokens)
    return {method: built[method] for method in methods}


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``mma fit`` builds, over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return make_optimizer(params, OptimizerConfig(lr=1e-5), torch.device("cpu"))


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


def time_train_step(model, batch, optimizer, precision: Precision | None = None) -> float:
    start = time.perf_counter()
    with precision.forward_context() if precision else nullcontext():
        loss = model.loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measured_step(model, batch, optimizer, precision: Precision, stats: StepStats) -> None:
    """One timed training step, its real tokens, model FLOPs and peak memory added to ``stats``."""
    device = next(model.parameters()).device
    reset_peak_memory(device)
    seconds = time_train_step(model, batch, optimizer, precision)
    stats.add(model, batch, seconds, peak_memory_mb(device))


def compute_dtype(precision: Precision) -> torch.dtype:
    """The dtype the recipe's matmuls run in: bf16 / fp16 under mixed or true half precision, else float32."""
    name = str(precision.precision)
    return torch.bfloat16 if name.startswith("bf16") else torch.float16 if name.startswith("16") else torch.float32


def time_generation(model, batch, precision: Precision) -> float:
    """Seconds per generated token (batch rows x steps); every run decodes NEW_TOKENS steps."""
    start = time.perf_counter()
    with precision.forward_context():
        model.generate(batch, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    return (time.perf_counter() - start) / (BATCH * NEW_TOKENS)


def time_text_step(llm, input_ids: torch.Tensor, optimizer, precision: Precision) -> float:
    """One optimizer step of the LLM alone on text, scoring the last SCORED positions (the LM head over every
    position would cost as much as the rest and hide the difference)."""
    start = time.perf_counter()
    with precision.forward_context():
        logits = llm(input_ids=input_ids, logits_to_keep=SCORED + 1).logits[:, :-1]
    loss = F.cross_entropy(logits.float().flatten(0, 1), input_ids[:, -SCORED:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compare_with_peft(config: str, steps: int) -> None:
    """mma's LLaMA-Adapter V2 reduced to adaption prompts against peft's adaption prompt, same LLM, same text."""
    ours, _, precision = build(
        config, "llama-adapter-v2", dict(gate="scalar", bias_scale=False, norms=False, visual_layers=0)
    )
    layers = len(ours.llm.model.layers)
    bare, _, _ = build(config, "none")
    peer = get_peft_model(bare.llm, AdaptionPromptConfig(adapter_len=10, adapter_layers=layers, task_type="CAUSAL_LM"))
    vocab = ours.llm.config.vocab_size
    input_ids = torch.randint(vocab // 10, vocab, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, llm in (("mma", ours.llm), ("peft", peer)):
        llm.train()
        optimizer = adamw(llm)
        runs[name] = dict(llm=llm, opt=optimizer, step=[])
        time_text_step(llm, input_ids, optimizer, precision)  # warm-up
    for _ in range(steps):
        for run in runs.values():
            run["step"].append(time_text_step(run["llm"], input_ids, run["opt"], precision))
    step = {name: statistics.median(run["step"]) for name, run in runs.items()}
    print(f"text-only LLM, adaption prompts in all {layers} layers: mma {step['mma']:.3f} s, peft {step['peft']:.3f} s")
    print(f"training step, mma / peft adaption prompt: {step['mma'] / step['peft']:.3f}x  (target <= 1.00x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/demo.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", choices=["filler", "scienceqa"], default="filler")
    parser.add_argument("--scienceqa", default="../shared/data/scienceqa-sample", help="ScienceQA folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.data == "scienceqa":
        from scienceqa_padding import compare_padding

        compare_padding(args.config, args.scienceqa, args.steps)
        return
    compare_adapters(args.config, args.steps, args.threads)
    compare_with_peft(args.config, args.steps)


def compare_adapters(config: str, steps: int, threads: int) -> None:
    """Training step and generation of every method in ADAPTERS, alternating, with what each step achieves."""
    runs = {}
    for adapter, (model, collator, precision) in build_all(config, ADAPTERS).items():
        train_batch = collator(samples(collator, TOKENS))
        prompt_batch = collator([{**s, "answer": None} for s in samples(collator, TOKENS // 2)])
        optimizer = adamw(model)
        runs[adapter] = dict(model=model, train=train_batch, prompt=prompt_batch, opt=optimizer, precision=precision)
        runs[adapter] |= dict(step=StepStats(), gen=[])
    peak = matmul_gflops(compute_dtype(precision), next(model.parameters()).device)
    print(f"batch {BATCH} x {train_batch['input_ids'].shape[1]} tokens, {threads} threads, {precision.precision}")
    print(f"matmul throughput (1024^2, {compute_dtype(precision)}): {peak:.1f} GFLOP/s")

    for run in runs.values():  # warm-up: allocator, autocast caches, first-call overheads
        run["model"].train()
        time_train_step(run["model"], run["train"], run["opt"], run["precision"])
    for _ in range(steps):
        for run in runs.values():
            run["model"].train()
            measured_step(run["model"], run["train"], run["opt"], run["precision"], run["step"])
            run["model"].eval()
            run["gen"].append(time_generation(run["model"], run["prompt"], run["precision"]))
    report_adapters(runs, peak)


def report_adapters(runs: dict, peak_gflops: float) -> None:
    step = {name: statistics.median(run["step"].seconds) for name, run in runs.items()}
    gen = {name: 1 / statistics.median(run["gen"]) for name, run in runs.items()}
    print(f"{'':>16}  step s  {HEADER}  generation tok/s")
    for name, run in runs.items():
        print(f"{name:>16}: {step[name]:6.3f} {run['step'].line(peak_gflops)}  {gen[name]:10.1f}")
    for name, target in TARGETS.items():
        print(f"training step, {name} / projector-only: {step[name] / step['none']:.3f}x  (target <= {target:.2f}x)")
    slots = runs["memvp"]["model"].llm.model.layers[0].mlp.positions.key.shape[0]
    print(
        f"training step, memvp ({slots} memory slots) / lavin: {step['memvp'] / step['lavin']:.3f}x  (target < 1.00x)"
    )
    print(f"generation tokens/s, lavin / projector-only: {gen['lavin'] / gen['none']:.3f}x  (target >= 0.90x)")
    print(f"generation tokens/s, llama-adapter-v2 / projector-only: {gen['llama-adapter-v2'] / gen['none']:.3f}x")


if __name__ == "__main__":
    main()
