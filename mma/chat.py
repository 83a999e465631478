"""Multi-turn chat with an adapted model that keeps its KV cache from turn to turn.

``VisionLanguageModel.generate`` answers a batch from scratch. A ``ChatSession`` holds one conversation's cache,
valid mask and layer inputs (the visual tokens under early fusion) between turns, so the picture and the earlier
turns are encoded once: a turn prefills only its new text, i.e. the EOS that closed the previous answer (generated
but never fed back) and the next user turn as the training template renders it (``ConversationCollator.turns``),
so the model reads what it was trained on.

The adapters' generation caches (LaVIN's routing weights, read from the modality token at position 0, and
LLaMA-Adapter V2's prompt keys and values) stay on for the whole conversation, since later turns never see
position 0 again. Run one session at a time and do not call ``generate`` in between: it resets those caches.
"""

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from PIL import Image
from transformers import DynamicCache

from mma.adapters.base import generation_caches
from mma.checkpoint import AdapterSource, read_adapter_config, saved_model_config
from mma.data.dialogue_collate import ConversationCollator, Message, TemplateName
from mma.errors import ConfigError
from mma.model import VisionLanguageModel
from mma.module import MMAModule


class ChatSession:
    """One conversation with ``model``, laid out by ``collator`` (the model's collator and the training template);
    answers are greedy and at most ``max_new_tokens`` long."""

    def __init__(self, model: VisionLanguageModel, collator: ConversationCollator, max_new_tokens: int = 128) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
        self.model, self.collator, self.max_new_tokens = model.train(False), collator, max_new_tokens
        self.tokenizer = model.tokenizer
        self._caches = ExitStack()
        self.reset()

    def reset(self, image: Image.Image | torch.Tensor | None = None) -> None:
        """Start a new conversation about ``image`` (or none): the picture sits at the start of the sequence, so a
        new picture means a new conversation."""
        self._caches.close()
        self.image = image
        self.messages: list[Message] = []
        self.cache: DynamicCache | None = None
        self.valid: torch.Tensor | None = None  # (1, T): every position in the cache, then the step input
        self.layer_inputs: dict[str, torch.Tensor] = {}
        self.has_image: torch.Tensor | None = None  # (1,)
        self.ids: list[int] = []  # every id fed so far (layout slots included)
        self.pending: list[int] = []  # generated but not yet fed: the EOS that closed the last answer

    @torch.no_grad()
    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The answer to the user turn ``text``; ``on_text`` receives the answer's text piece by piece."""
        self.messages.append({"role": "user", "content": text})
        tokens = self._generate(self._prefill_embeddings(), on_text)
        answer = self.tokenizer.decode(self._content(tokens), skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _prefill_embeddings(self) -> torch.Tensor:
        """(1, T_new, d) embeddings of what this turn adds; extends ``valid`` to cover them."""
        device = self.model.llm.device
        if self.cache is None:
            batch = self.collator.prompts([{"messages": self.messages, "image": self.image}])
            pixels = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
            self.has_image = batch["has_image"].to(device)
            self.valid = batch["attention_mask"].bool().to(device)
            self.ids = batch["input_ids"][0].tolist()
            embeddings, self.layer_inputs = self.model.embed(batch["input_ids"].to(device), pixels, self.has_image)
            self.cache = DynamicCache(config=self.model.llm.config)
            self._caches.enter_context(generation_caches(self.model.llm))
            return embeddings
        new = self.pending + self.collator.turns(self.messages, generation_prompt=True)[-1][0]
        return self._feed(new)

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Embeddings (1, len(ids), d) of plain tokens about to be fed; ``valid`` grows by as many positions."""
        self.valid = torch.cat([self.valid, self.valid.new_ones(1, len(ids))], dim=1)
        self.ids += ids
        embeddings, _ = self.model.embed(torch.tensor([ids], device=self.valid.device), None, self.has_image)
        return embeddings

    def _generate(self, step_input: torch.Tensor, on_text: Callable[[str], None] | None) -> list[int]:
        """Greedy tokens after ``step_input``; the last one (EOS, or the last allowed) is left for the next turn."""
        eos, tokens, shown = self.tokenizer.eos_token_id, [], ""
        for _ in range(self.max_new_tokens):
            token = int(self._forward(step_input).argmax(-1))
            tokens.append(token)
            done = token == eos or len(tokens) == self.max_new_tokens
            if on_text is not None:
                text = self._text(tokens)
                if done or not text.endswith("\ufffd"):  # a partial UTF-8 character waits for its next byte
                    on_text(text[len(shown) :])
                    shown = text
            if done:
                break
            step_input = self._feed([token])
        # An answer cut by max_new_tokens is closed with EOS, as the template closes every answer.
        self.pending = tokens[-1:] + ([eos] if tokens[-1] != eos else [])
        return tokens

    def _forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits (1, vocab) of the next token after ``embeddings`` (1, Q, d), which join the cache."""
        query = embeddings.shape[1]
        out = self.model.llm(
            inputs_embeds=embeddings,
            attention_mask=self.model.attention_mask(self.valid, query),
            position_ids=self.model.position_ids(self.valid)[:, -query:],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **self.layer_inputs,
        )
        return out.logits[:, -1]

    def _content(self, tokens: list[int]) -> list[int]:
        return tokens[:-1] if tokens and tokens[-1] == self.tokenizer.eos_token_id else tokens

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(self._content(tokens), skip_special_tokens=True).lstrip()


def load_chat(
    adapter: str | Path,
    template: TemplateName | None = None,
    max_new_tokens: int = 128,
    ignore_fingerprint: bool = False,
    max_length: int | None = None,
) -> ChatSession:
    """A session on an exported adapter's backbones, laid out with ``template`` (default: the one it was trained
    with, as its training record says, else the tokenizer's chat template when it has one, else ``plain``);
    ``max_length`` (default: the training one) bounds the rows its collator lays out for scoring."""
    saved = read_adapter_config(adapter)
    module = MMAModule(
        saved_model_config(saved, Path(adapter)),
        max_length=max_length or saved["prompt_format"]["max_length"],
        adapter=AdapterSource(str(adapter), ignore_fingerprint),
    )
    module.configure_model()
    trained_with = saved.get("training", {}).get("data", {}).get("template")
    template = template or trained_with or ("chat" if module.model.tokenizer.chat_template else "plain")
    return ChatSession(module.model, ConversationCollator(module.make_collator(), template), max_new_tokens)
