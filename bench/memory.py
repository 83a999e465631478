"""Peak process memory of loading a ~1.1B LLaMA and taking one LoRA training step, in fp32, bf16 and NF4.

    python bench/memory.py [--folder /tmp/mma-llama-1b] [--threads 2]

The model (TinyLlama-1.1B's shape, random weights) is saved once to a local folder. Each mode then runs in a
fresh process: load (NF4: mma's streaming 4-bit load), LoRA r 8 on q/v, activation checkpointing on every decoder
layer, one AdamW step on a batch of 2 x 256 tokens. The peak resident memory (VmHWM) of each process is printed
with its ratio to fp32. Target: NF4 at most 0.40x fp32.
"""

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
MODES = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "nf4": ("bfloat16", "nf4")}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def save_model(folder: Path) -> None:
    from mma.backbones import LLMSpec, load_llm

    model, tokenizer = load_llm(LLMSpec(config=SHAPE))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def one_step(folder: Path, mode: str, threads: int) -> dict:
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from mma.adapters import set_trainable_params
    from mma.backbones import LLMSpec, load_llm

    torch.set_num_threads(threads)
    dtype, quantization = MODES[mode]
    llm, _ = load_llm(LLMSpec(path=str(folder), dtype=dtype, quantization=quantization))
    loaded = peak_rss_mb()
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), llm)
    set_trainable_params(llm)
    wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(
        llm, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, LlamaDecoderLayer)
    )
    optimizer = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
        loss = llm(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    return {"mode": mode, "after_load_mb": loaded, "peak_mb": peak_rss_mb(), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/mma-llama-1b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # a child process: one mode
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)  # a child process: write the model
    args = parser.parse_args()
    folder = Path(args.folder)
    if args.save:
        save_model(folder)
        return
    if args.mode:
        print(json.dumps(one_step(folder, args.mode, args.threads)))
        return
    if not (folder / "config.json").is_file():
        print(f"saving a random 1.1B LLaMA to {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--folder", str(folder), "--save"], check=True)
    results = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--folder", str(folder), "--mode", mode, "--threads", str(args.threads)],
            check=True,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:>5}: peak {r['peak_mb']:8.0f} MB (after load {r['after_load_mb']:.0f} MB), loss {r['loss']:.3f}")
    for mode in ("bf16", "nf4"):
        print(
            f"peak {mode} / fp32: {results[mode]['peak_mb'] / results['fp32']['peak_mb']:.2f}x"
            + ("  (target <= 0.40x)" if mode == "nf4" else "")
        )


if __name__ == "__main__":
    main()
