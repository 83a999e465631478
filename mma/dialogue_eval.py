"""What two-stage conversation training did, in three tables:

- **forgetting**: mean negative log-likelihood per answer token of held-out text-only conversations (e.g. Alpaca)
  under the model before stage 2 and after it; text-only rows never reach the projector, so "before" (stage 1's
  adapter, or any freshly initialised one: adapters start as the identity) is the bare LLM;
- **routers**: LaVIN's mean routing weights per router, over conversations with a picture and over text-only ones
  (MMA's claim: the modality token sends the two kinds to different experts), and for each LLM router why it
  could or could not: how alike its input is for the two modalities (the modality token's normed hidden state)
  and how far apart its two experts grew;
- **turns**: accuracy of each turn of easy-vqa test dialogues asked in one chat session, the model's own earlier
  answers in its cache (turn 2 needs the picture and the first exchange to survive the cache).

``python -m mma.dialogue_eval --adapter AFTER --before BEFORE --alpaca FILE --alpaca-from 899``
"""

import argparse
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from mma.adapters.lavin import RouterAdapter, modality_router_inputs
from mma.chat import ChatSession, load_chat
from mma.data.conversations import Conversation, ConversationDataset, ConversationSource, read_source
from mma.data.dialogue_collate import ConversationCollator
from mma.data.easyvqa import OPTIONS, QUESTION_TYPE
from mma.model import VisionLanguageModel


def batches(conversations: Sequence[Conversation], size: int) -> list[list[dict]]:
    """Samples (pictures decoded) in batches of ``size``."""
    samples = ConversationDataset(list(conversations))
    return [
        [samples[i] for i in range(start, min(start + size, len(samples)))] for start in range(0, len(samples), size)
    ]


def fitting(conversations: Sequence[Conversation], collators: Sequence[ConversationCollator]) -> list[Conversation]:
    """The conversations whose first turn fits every collator's ``max_length``, so models compare on the same ones."""
    return [c for c in conversations if all(collator.fits(c.undecoded()) for collator in collators)]


@torch.no_grad()
def answer_nll(
    model: VisionLanguageModel,
    collator: ConversationCollator,
    conversations: Sequence[Conversation],
    batch_size: int = 8,
) -> tuple[float, int]:
    """Mean negative log-likelihood per answer token over every assistant turn, and the token count."""
    total, count = 0.0, 0
    model.train(False)
    for samples in batches(conversations, batch_size):
        logprobs, _ = model.token_logprobs(collator(samples))
        total, count = total - float(logprobs.sum()), count + logprobs.numel()
    return total / max(count, 1), count


@torch.no_grad()
def routing_weights(
    model: VisionLanguageModel,
    collator: ConversationCollator,
    conversations: Sequence[Conversation],
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Router name -> mean routing weights (experts,) over the rows that reached it."""
    sums: dict[str, list] = {}

    def record(name: str):
        def hook(module: RouterAdapter, args: tuple) -> None:
            weights = module.routing_weights(args[0]).float()  # (B, E)
            total = sums.setdefault(name, [torch.zeros(weights.shape[1]), 0])
            total[0] += weights.sum(0).cpu()
            total[1] += weights.shape[0]

        return hook

    routers = [(n, m) for n, m in model.named_modules() if isinstance(m, RouterAdapter) and m.router is not None]
    handles = [module.register_forward_pre_hook(record(name)) for name, module in routers]
    model.train(False)
    try:
        for samples in batches(conversations, batch_size):
            model.hidden_states(collator(samples))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / rows for name, (total, rows) in sums.items()}


def is_correct(answer: str, gold: str) -> bool:
    """The answer names the gold option and no other option of its question type."""
    words = set(re.findall(r"[a-z/]+", answer.lower()))
    others = set(OPTIONS[QUESTION_TYPE[gold]]) - {gold}
    return gold in words and not words & others


def rotations(dialogues: Sequence[Conversation], turns: int) -> list[Conversation]:
    """Each dialogue of ``turns`` exchanges in every cyclic order of its exchanges, so every question is asked
    once at each turn: the accuracies of turn 1 and turn k then cover the same questions, and differ only by
    where in the session they are asked."""
    rotated = []
    for d in dialogues:
        pairs = [d.messages[i : i + 2] for i in range(0, 2 * turns, 2)]
        for k in range(turns):
            messages = tuple(m for pair in pairs[k:] + pairs[:k] for m in pair)
            rotated.append(Conversation(f"{d.id}@{k}", messages, d.image))
    return rotated


def turn_accuracy(session: ChatSession, conversations: Sequence[Conversation]) -> list[float]:
    """Accuracy of turn 1, 2, ... over easy-vqa dialogues, each asked in one session (own answers in the cache)."""
    right: dict[int, list[bool]] = defaultdict(list)
    for conversation, sample in zip(conversations, ConversationDataset(list(conversations)), strict=True):
        session.reset(sample["image"])
        turns = zip(conversation.messages[::2], conversation.messages[1::2], strict=True)
        for i, (question, gold) in enumerate(turns):
            right[i].append(is_correct(session.ask(question["content"]), gold["content"]))
    return [sum(right[i]) / len(right[i]) for i in sorted(right)]


def forgetting_table(before: tuple[float, int], after: tuple[float, int]) -> Table:
    table = Table(title="forgetting", caption="held-out text-only answers: NLL per token, lower is better")
    for column in ("model", "NLL", "perplexity", "tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, (nll, tokens) in (("before stage 2", before), ("after stage 2", after)):
        table.add_row(name, f"{nll:.3f}", f"{torch.tensor(nll).exp():.1f}", f"{tokens:,}")
    return table


@torch.no_grad()
def router_inputs_and_experts(model: VisionLanguageModel) -> dict[str, tuple[float, float]]:
    """LLM router name -> (cosine of what it reads for a picture and for text only, its experts' distance)."""
    names = {module: name for name, module in model.named_modules()}
    image, text = (modality_router_inputs(model, has_image) for has_image in (True, False))
    return {
        names[adapter]: (F.cosine_similarity(image[adapter], text[adapter], dim=0).item(), adapter.expert_distance())
        for adapter in image
        if adapter.router is not None
    }


def router_table(
    image: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    llm_routers: dict[str, tuple[float, float]] | None = None,
) -> Table:
    llm_routers = llm_routers or {}
    caption = "mean weight of expert 0 / expert 1"
    columns = ["router", "with a picture", "text only"]
    if llm_routers:
        caption += "; input cosine: the router's input with a picture vs text only; experts apart: |B - D| / mean |.|"
        columns += ["input cosine", "experts apart"]
    table = Table(title="LaVIN routers", caption=caption)
    for column in columns:
        table.add_column(column, justify="left" if column == "router" else "right")
    for name in sorted(image.keys() | text.keys(), key=_router_order):
        cells = [" / ".join(f"{w:.2f}" for w in side[name]) if name in side else "-" for side in (image, text)]
        if llm_routers:
            cells += [f"{v:.3f}" for v in llm_routers[name]] if name in llm_routers else ["-", "-"]
        table.add_row(_router_label(name), *cells)
    return table


def _router_order(name: str) -> tuple[str, int]:
    numbers = re.findall(r"\.(\d+)\.", name)
    return name.split(".")[0], int(numbers[0]) if numbers else -1


def _router_label(name: str) -> str:
    tower, index = _router_order(name)
    return f"{tower.upper() if tower == 'llm' else 'ViT'} block {index}"


def turn_table(accuracy: list[float], count: int) -> Table:
    table = Table(
        title="accuracy per turn, %",
        caption=f"{count} easy-vqa test pictures, a chat session for every order of their questions",
        min_width=48,
    )
    for i in range(len(accuracy)):
        table.add_column(f"turn {i + 1}", justify="right")
    table.add_row(*(f"{100 * a:.1f}" for a in accuracy))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mma.dialogue_eval", description=__doc__)
    parser.add_argument("--adapter", required=True, help="the stage-2 adapter folder")
    parser.add_argument("--before", help="the adapter before stage 2 (stage 1's), for the forgetting table")
    parser.add_argument("--alpaca", help="held-out text-only conversations (Alpaca JSON) for forgetting and routers")
    parser.add_argument("--alpaca-from", type=int, default=0, help="first record held out (default: %(default)s)")
    parser.add_argument("--pictures", type=int, default=200, help="easy-vqa test pictures (default: %(default)s)")
    parser.add_argument("--turns", type=int, default=2, help="questions per picture (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="longest answer (default: %(default)s)")
    args = parser.parse_args(argv)
    from mma.data.easyvqa import read_split
    from mma.data.easyvqa_conversations import dialogue_conversations

    console, after = Console(), load_chat(Path(args.adapter), max_new_tokens=args.max_new_tokens)
    every = dialogue_conversations(read_split("test"), "test", args.turns)
    dialogues = [d for d in every if len(d.messages) == 2 * args.turns][: args.pictures]
    texts = read_source(ConversationSource(args.alpaca))[args.alpaca_from :] if args.alpaca else []
    if texts and args.before:
        max_length = after.collator.base.max_length
        before = load_chat(Path(args.before), after.collator.renderer.name, args.max_new_tokens, max_length=max_length)
        texts = fitting(texts, [after.collator, before.collator])
        after_nll = answer_nll(after.model, after.collator, texts)
        console.print(forgetting_table(answer_nll(before.model, before.collator, texts), after_nll))
    image = routing_weights(after.model, after.collator, dialogues)
    if image:
        text = routing_weights(after.model, after.collator, texts) if texts else {}
        console.print(router_table(image, text, router_inputs_and_experts(after.model)))
    console.print(turn_table(turn_accuracy(after, rotations(dialogues, args.turns)), len(dialogues)))


if __name__ == "__main__":
    main()
