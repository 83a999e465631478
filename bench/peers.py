"""mma against its peers at one fixed shape: LoRA, adaption prompts and LLaMA-Adapter V2 training steps side by side.

    python bench/peers.py [--config recipes/demo.yaml] [--steps 7] [--threads 2] [--compile] [--methods LoRA ...]

One optimizer step (forward, backward, AdamW) on a text-only batch of 4 x 256 tokens, the loss on the last 16 (the
LM head over every position would cost as much as the rest in every framework and hide the difference), float32,
the recipe's LLM (SmolLM2-135M: 30 layers, hidden 576). Every step of every row alternates with the others, so
machine drift hits all alike; the table gives the median of ``--steps`` steps after one warm-up, the spread
(min-max) and each row's ratio to the fastest peer of its method.

Rows, with matched settings:
  LoRA (r 8, alpha 16, dropout 0.05, on the query and value projections):
    mma's LoRA (``MMAModule``'s loss on mma's collated batch), peft's LoRA on the plain HF model, litgpt's lora;
  adaption prompts (10 tokens in every layer, no bias/scale or norms):
    mma's LLaMA-Adapter V2 reduced to them (one ungated scalar per layer, as peft), peft's adaption prompt,
    litgpt's adapter (LLaMA-Adapter v1: a gate per head);
  LLaMA-Adapter V2 (10-token prompts in every layer but the first, bias and scale on every linear, norms trained):
    mma's V2 with its default settings, litgpt's adapter_v2 (from layer 1).
``--compile`` adds mma's rows with the loss compiled as ``MMAModule(compile=True)`` compiles it
(``mma.module.compiled_loss``; the first compiled steps, left out of the timing, compile).

litgpt is optional and not a package extra: its pins (huggingface-hub<1.4) exclude the transformers 5 mma needs, so
``make bench-peers`` installs it beside mma with ``--no-deps``; without it its rows are skipped with a message.
Mismatches that stay: litgpt runs its own model (fused qkv, its own RoPE and attention call, random weights of the
same shapes), peft and litgpt call attention with ``is_causal`` while mma passes the explicit mask its layouts need
(modality token, padding). Run it alone: another busy process on two cores makes the numbers meaningless.
"""

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft import AdaptionPromptConfig, LoraConfig, get_peft_model
from train_step import adamw, build  # bench/ is on sys.path

from mma.data.collate import IGNORE_INDEX
from mma.module import compiled_loss

BATCH, TOKENS, SCORED = 4, 256, 16
LORA = dict(r=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])
PROMPT_LENGTH = 10
LITGPT_NAME = "SmolLM2-135M"
METHODS = ["LoRA", "adaption prompts", "LLaMA-Adapter V2"]


class LastPositions(torch.nn.Module):
    """A peer's LM head applied to the last ``keep`` positions only (as mma and ``logits_to_keep`` do)."""

    def __init__(self, head: torch.nn.Module, keep: int) -> None:
        super().__init__()
        self.head, self.keep = head, keep

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden[:, -self.keep :])


def mma_batch(model, collator, generator: torch.Generator) -> dict:
    """A text-only batch of TOKENS tokens a row (after the layout's head), the last SCORED labelled."""
    head = collator.prefix(has_image=False)
    vocab = model.llm.config.vocab_size
    rows = []
    for _ in range(BATCH):
        ids = head + torch.randint(vocab // 10, vocab, (TOKENS - len(head),), generator=generator).tolist()
        rows.append((ids, [IGNORE_INDEX] * (TOKENS - SCORED) + ids[-SCORED:]))
    return collator.pad(rows) | {"has_image": torch.zeros(BATCH, dtype=torch.bool), "pixel_values": None}


def scored_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the last SCORED tokens from logits of the last SCORED + 1 positions."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, -SCORED:].flatten())


def mma_rows(config: str, compiled: bool, methods: list[str]) -> dict[str, tuple]:
    """(method, framework) -> (trainable module, loss thunk) of mma's three methods."""
    generator = torch.Generator().manual_seed(0)
    settings = {
        "LoRA": ("lora", dict(rank=LORA["r"], alpha=LORA["alpha"], lora_dropout=LORA["dropout"])),
        "adaption prompts": ("llama-adapter-v2", dict(gate="scalar", bias_scale=False, norms=False, visual_layers=0)),
        "LLaMA-Adapter V2": ("llama-adapter-v2", dict(prompt_length=PROMPT_LENGTH)),
    }
    rows = {}
    for method in methods:
        name, options = settings[method]
        model, collator, _ = build(config, name, options)
        model.train()
        batch = mma_batch(model, collator, generator)
        rows[method, "mma"] = (model, lambda m=model, b=batch: m.loss(b))
        if compiled:
            loss = compiled_loss(model)
            rows[method, "mma, compiled"] = (model, lambda f=loss, b=batch: f(b))
    return rows


def peft_rows(config: str, input_ids: torch.Tensor, methods: list[str], layers: int) -> dict[str, tuple]:
    """peft's LoRA and adaption prompt on the recipe's plain HF LLM."""
    lora = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"]
    )
    prompts = AdaptionPromptConfig(adapter_len=PROMPT_LENGTH, adapter_layers=layers, task_type="CAUSAL_LM")
    rows = {}
    for method, peft_config in (("LoRA", lora), ("adaption prompts", prompts)):
        if method not in methods:
            continue
        peer = get_peft_model(build(config, "none")[0].llm, peft_config)
        peer.train()
        forward = lambda p=peer: p(input_ids=input_ids, logits_to_keep=SCORED + 1).logits  # noqa: E731
        rows[method, "peft"] = (peer, lambda f=forward: scored_loss(f(), input_ids))
    return rows


def litgpt_rows(input_ids: torch.Tensor, methods: list[str], v2_start_layer: int) -> dict[str, tuple]:
    """litgpt's lora, adapter and adapter_v2 models of the same shape (random weights)."""
    from litgpt import adapter, adapter_v2, lora

    specs = {
        "LoRA": (
            lora,
            dict(
                lora_r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                lora_query=True,
                lora_key=False,
                lora_value=True,
                lora_projection=False,
                lora_mlp=False,
                lora_head=False,
            ),
            lora.mark_only_lora_as_trainable,
        ),
        "adaption prompts": (
            adapter,
            dict(adapter_prompt_length=PROMPT_LENGTH, adapter_start_layer=0),
            adapter.mark_only_adapter_as_trainable,
        ),
        "LLaMA-Adapter V2": (
            adapter_v2,
            dict(adapter_prompt_length=PROMPT_LENGTH, adapter_start_layer=v2_start_layer),
            adapter_v2.mark_only_adapter_v2_as_trainable,
        ),
    }
    rows = {}
    for method in methods:
        module, options, mark_trainable = specs[method]
        torch.manual_seed(0)
        peer = module.GPT(module.Config.from_name(LITGPT_NAME, **options))
        peer.max_seq_length = TOKENS
        peer.lm_head = LastPositions(peer.lm_head, SCORED + 1)
        mark_trainable(peer)
        peer.train()
        rows[method, "litgpt"] = (peer, lambda p=peer: litgpt_loss(p, input_ids))
    return rows


def litgpt_loss(peer: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The scored loss of a litgpt model. litgpt 0.5.13's adapters keep the prompt's keys and values from their
    first call, in training too (a second backward through them fails): they are dropped before each step, so
    each step computes them, as mma's and peft's do."""
    for module in peer.modules():
        if getattr(module, "adapter_kv_cache", None) is not None:
            module.adapter_kv_cache = None
    return scored_loss(peer(input_ids), input_ids)


def time_step(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    loss().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def report(times: dict[tuple[str, str], list[float]]) -> None:
    print(f"{'method':>18}  {'framework':<15} {'median s':>8}  {'spread s':>13}  {'/ fastest peer':>14}")
    for method in dict.fromkeys(m for m, _ in times):
        peers = [statistics.median(v) for (m, who), v in times.items() if m == method and not who.startswith("mma")]
        fastest = min(peers) if peers else None
        for (m, who), values in times.items():
            if m != method:
                continue
            median = statistics.median(values)
            ratio = f"{median / fastest:.3f}x" if fastest else "-"
            print(f"{m:>18}  {who:<15} {median:8.3f}  {min(values):6.3f}-{max(values):6.3f}  {ratio:>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also mma's rows with the loss compiled")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="(default: all three)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = mma_rows(args.config, args.compile, args.methods)
    llm = next(iter(rows.values()))[0].llm
    vocab, layers = llm.config.vocab_size, llm.config.num_hidden_layers
    input_ids = torch.randint(vocab // 10, vocab, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    rows |= peft_rows(args.config, input_ids, args.methods, layers)
    if importlib.util.find_spec("litgpt") is None:
        print("litgpt is not installed (make bench-peers installs it): its rows are skipped")
    else:
        # mma's V2 puts a prompt in every layer after the first
        rows |= litgpt_rows(input_ids, args.methods, v2_start_layer=1)
    rows = dict(sorted(rows.items(), key=lambda item: METHODS.index(item[0][0])))  # stable: mma, peft, litgpt

    optimizers = {key: adamw(module) for key, (module, _) in rows.items()}
    print(
        f"batch {BATCH} x {TOKENS} tokens, loss on the last {SCORED}, float32, {args.threads} threads, {layers} layers"
    )
    for key, (_, loss) in rows.items():  # warm-up (and compilation)
        for _ in range(2 if "compiled" in key[1] else 1):
            time_step(loss, optimizers[key])
    times: dict[tuple[str, str], list[float]] = {key: [] for key in rows}
    for _ in range(args.steps):
        for key, (_, loss) in rows.items():
            times[key].append(time_step(loss, optimizers[key]))
    report(times)


if __name__ == "__main__":
    main()
