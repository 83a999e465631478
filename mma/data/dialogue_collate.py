"""Conversations -> token rows in which every assistant turn is trained and everything else is masked.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}`` with at most one
picture. The picture sits where the layout puts it for single-turn samples, at the start of the row (LLaVA and
LaVIN mark it with ``<image>`` in the first human turn; the readers drop the tag, so with one picture per
conversation only the few words before the tag, if any, change places)::

    [modality] [BOS] image_prefix [visual tokens] prompt_separator <conversation as the template renders it>

Templates (``template``):

- ``chat``: the tokenizer's own chat template (``tokenizer.chat_template``: SmolLM2-Instruct's ChatML, ...);
- ``plain``: LaVIN's ``Instruction: ...\\nResponse: answer</s>`` for every turn, the turns one after another (LaVIN's
  own data code splits a conversation into single turns of this form);
- ``caption``: LLaVA's pretraining form (its ``plain`` conversation template): the user turns are dropped and only
  the answers (captions) follow the picture.

The label mask comes from character offsets: the conversation is rendered prefix by prefix, and what an assistant
turn adds after the prompt rendered with the generation prompt, up to and including the EOS token, is trained
(``return_assistant_tokens_mask`` would need ``{% generation %}`` markers, which SmolLM2's template lacks). The
text is then tokenized piece by piece, so a turn's prompt has the tokens it has when ``mma.chat`` prefills it alone
and no token straddles a label boundary.

A row longer than ``max_length`` keeps the whole turns (prompt + answer) from the start that fit, never part of an
answer; a conversation whose first turn does not fit is left out of its batch. Both are counted and logged.
"""

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from mma.data.collate import VLMCollator
from mma.errors import ConfigError, DataError
from mma.layout import IGNORE_INDEX

log = logging.getLogger(__name__)

TemplateName = Literal["chat", "plain", "caption"]
Message = dict[str, str]
Turn = tuple[list[int], list[int]]  # (masked prompt tokens, trained answer tokens)

# Jinja, rendered by the tokenizer's ``apply_chat_template`` like any chat template (``eos_token`` is in scope).
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n"
    "{% elif m.role == 'user' %}Instruction: {{ m.content }}\nResponse:"
    "{% else %} {{ m.content }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
)
CAPTION_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
)


def template_text(tokenizer: PreTrainedTokenizerBase, name: TemplateName) -> str:
    """The Jinja text of template ``name``; ``chat`` needs a tokenizer that has its own."""
    if name == "plain":
        return PLAIN_TEMPLATE
    if name == "caption":
        return CAPTION_TEMPLATE
    if name != "chat":
        raise ConfigError(f"template={name!r} must be 'chat', 'plain' or 'caption'")
    if not tokenizer.chat_template:
        raise ConfigError("template=chat, but the LLM's tokenizer has no chat template: use template: plain")
    return tokenizer.chat_template


class ChatRenderer:
    """Renders conversations with one template and splits the text into masked and trained pieces."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: TemplateName) -> None:
        self.tokenizer, self.name = tokenizer, template
        self.template = template_text(tokenizer, template)
        self.eos = tokenizer.eos_token or ""

    def render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def pieces(self, messages: Sequence[Message], generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """``(text, trained)`` pieces whose concatenation is the rendered conversation: masked, answer, masked,
        answer, ..., masked (the text after the last answer, with ``generation_prompt`` the next turn's prompt)."""
        full = self.render(messages, generation_prompt)
        pieces, done = [], 0
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = self._answer_span(messages, i, full)
                pieces += [(full[done:start], False), (full[start:end], True)]
                done = end
        return [*pieces, (full[done:], False)]

    def _answer_span(self, messages: Sequence[Message], i: int, full: str) -> tuple[int, int]:
        """Character span of answer ``i`` in ``full``: after its prompt, through the EOS token it ends with."""
        prompt = self.render(messages[:i], True)
        answered = self.render(messages[: i + 1], False)
        if not (answered.startswith(prompt) and full.startswith(answered)):
            raise ConfigError(
                "the chat template does not render a conversation as a continuation of its earlier turns, so its "
                "answers cannot be located: use template: plain"
            )
        added = answered[len(prompt) :]
        stop = added.rfind(self.eos) if self.eos else -1
        return len(prompt), len(prompt) + (stop + len(self.eos) if stop >= 0 else len(added))


class ConversationCollator:
    """Conversations -> left-padded rows with labels on every assistant turn, in the model's layout.

    Wraps the model's ``VLMCollator`` (tokenizer, layout head, padding, picture transform, ``max_length``) instead
    of repeating it. A sample is ``{"messages": [...], "image": PIL image, (3, H, W) tensor or None}``; other keys
    (``id``) pass through as lists.
    """

    def __init__(self, base: VLMCollator, template: TemplateName = "chat") -> None:
        self.base = base
        self.renderer = ChatRenderer(base.tokenizer, template)
        self.cut = 0  # conversations cut to fewer turns by this process
        self.dropped = 0  # conversations left out: not even their first turn fits

    def __call__(self, samples: list[dict]) -> dict:
        rows = [(sample, self.sequence(sample)) for sample in samples]
        kept = [(sample, row) for sample, row in rows if row is not None]
        if not kept:
            raise DataError(
                f"every conversation of a batch ({[s.get('id', '?') for s in samples]}) has a first turn longer than "
                f"max_length ({self.base.max_length}) allows: raise max_length"
            )
        return self._batch([sample for sample, _ in kept], [row for _, row in kept])

    def prompts(self, samples: list[dict]) -> dict:
        """Rows for ``generate``: each conversation (ending with a user turn) and the generation prompt."""
        rows = []
        for sample in samples:
            ids = self.base.prefix(sample["image"] is not None)
            ids = ids + [t for prompt, answer in self.turns(sample["messages"], True) for t in prompt + answer]
            rows.append((ids, [IGNORE_INDEX] * len(ids)))
        return self._batch(samples, rows)

    def turns(self, messages: Sequence[Message], generation_prompt: bool = False) -> list[Turn]:
        """(prompt, answer) tokens of every assistant turn, then (the text after the last answer, [])."""
        pieces = self.renderer.pieces(messages, generation_prompt)
        encoded = [self.base.encode(text) for text, _ in pieces]
        encoded[0] = self.base.encode(self.base.layout.prompt_separator + pieces[0][0])
        return [(encoded[k], encoded[k + 1] if k + 1 < len(encoded) else []) for k in range(0, len(encoded), 2)]

    def fits(self, sample: dict) -> bool:
        """Whether at least the conversation's first turn fits ``max_length`` (the picture need not be decoded:
        ``sample["image"]`` only has to be None for a text-only one)."""
        head, turns = self._head_and_turns(sample)
        return self._turns_that_fit(head, turns) > 0

    def sequence(self, sample: dict) -> tuple[list[int], list[int]] | None:
        """Token ids and labels of one conversation, cut after the last whole turn that fits ``max_length``; None
        (the conversation is left out) when not even the first turn fits."""
        head, turns = self._head_and_turns(sample)
        kept = self._turns_that_fit(head, turns)
        if kept < len(turns):
            self._count(sample, kept, len(turns))
        if kept == 0:
            return None
        ids, labels = list(head), [IGNORE_INDEX] * len(head)
        for prompt, answer in turns[:kept]:
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
        return ids, labels

    def _head_and_turns(self, sample: dict) -> tuple[list[int], list[Turn]]:
        """The modality/picture prefix and the (prompt, answer) tokens of every trained turn."""
        turns = self.turns(sample["messages"])[:-1]  # the text after the last answer is never trained
        if not turns:
            raise DataError(f"conversation {sample.get('id', '?')} has no assistant turn to train on")
        return self.base.prefix(sample["image"] is not None), turns

    def _turns_that_fit(self, head: list[int], turns: list[Turn]) -> int:
        budget = self.base.max_length - int(self.base.modality_token) - len(head)
        lengths = torch.tensor([len(prompt) + len(answer) for prompt, answer in turns]).cumsum(0)
        return int((lengths <= budget).sum())

    def _count(self, sample: dict, kept: int, total: int) -> None:
        """Count a conversation cut short (``cut``) or left out (``dropped``, ``kept`` 0); log the 1st, 2nd, 4th,
        8th, ... of each, so a long run logs a few lines with running totals."""
        kind = "cut" if kept else "dropped"
        setattr(self, kind, getattr(self, kind) + 1)
        count = getattr(self, kind)
        if count & (count - 1) == 0:
            log.warning(
                "conversation %s is longer than max_length %d: %s (%d conversations cut, %d left out so far by "
                "this process)",
                sample.get("id", "?"),
                self.base.max_length,
                f"trained on its first {kept} of {total} turns" if kept else "left out, its first turn does not fit",
                self.cut,
                self.dropped,
            )

    def _batch(self, samples: list[dict], rows: list[tuple[list[int], list[int]]]) -> dict:
        batch = self.base.pad(rows)
        images = [self.base.pixels(sample["image"]) for sample in samples if sample["image"] is not None]
        batch["pixel_values"] = torch.stack(images) if images else None
        batch["has_image"] = torch.tensor([sample["image"] is not None for sample in samples])
        for key in samples[0].keys() - {"messages", "image"}:
            batch[key] = [sample[key] for sample in samples]
        return batch
