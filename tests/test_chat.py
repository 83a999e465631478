"""Chat sessions keep their KV cache across turns: one prefill per turn holding only the new text, answers equal to a
full recompute of the whole conversation, and ``mma chat --script`` on an exported adapter."""

import pytest
import torch
from conftest import collator_for, image, perturb, tiny_config, tiny_model

from mma.chat import ChatSession, load_chat
from mma.checkpoint import save_adapter
from mma.cli import main
from mma.data.dialogue_collate import ConversationCollator

QUESTIONS = ["What colour is it?", "And the shape?", "Is it big?"]


@pytest.fixture(params=["lavin", "llama-adapter-v2"])
def session(request) -> ChatSession:
    """A session on a tiny adapted model with moved weights (LaVIN: routers; LLaMA-Adapter V2: early fusion)."""
    model = tiny_model(request.param)
    perturb(model, seed=2)
    session = ChatSession(model, ConversationCollator(collator_for(model), "plain"), max_new_tokens=5)
    session.reset(image(0))
    return session


def forward_lengths(model) -> list[int]:
    """Query lengths of every LLM forward call from now on."""
    lengths: list[int] = []
    model.llm.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    return lengths


def new_tokens(session: ChatSession, question: str) -> int:
    """Tokens the next turn should prefill: the whole prompt first, then the closing EOS and the new turn only."""
    messages = [*session.messages, {"role": "user", "content": question}]
    if not session.messages:
        return session.collator.prompts([{"messages": messages, "image": session.image}])["input_ids"].shape[1]
    return len(session.pending) + len(session.collator.turns(messages, generation_prompt=True)[-1][0])


def test_a_three_turn_session_prefills_once_per_turn_and_only_the_new_turn(session):
    lengths = forward_lengths(session.model)
    expected, cached = [], []
    for question in QUESTIONS:
        expected.append(new_tokens(session, question))
        cached.append(len(session.ids))
        assert isinstance(session.ask(question), str)
    assert sum(n > 1 for n in lengths) == 3  # one prefill per turn, then one token per call
    assert [n for n in lengths if n > 1] == expected
    assert expected[1] < cached[1] and expected[2] < cached[2]  # earlier turns are not encoded again
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3


def test_cached_turns_answer_as_a_full_recompute_does(session):
    for question in QUESTIONS[:2]:
        session.ask(question)
    messages = [*session.messages, {"role": "user", "content": QUESTIONS[2]}]
    ids = session.ids + session.pending + session.collator.turns(messages, generation_prompt=True)[-1][0]
    batch = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": image(0)[None],
        "has_image": torch.tensor([True]),
    }
    tokens = session.model.generate(batch, max_new_tokens=5, use_cache=False)[0]
    expected = session.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert session.ask(QUESTIONS[2]) == expected


def test_reset_forgets_the_conversation_and_answers_the_same_again(session):
    first = session.ask(QUESTIONS[0])
    session.ask(QUESTIONS[1])
    session.reset(session.image)
    assert session.messages == [] and session.cache is None
    assert session.ask(QUESTIONS[0]) == first


def test_chat_command_runs_a_three_turn_script_on_an_exported_adapter(tmp_path, capsys, blank_image, monkeypatch):
    model = tiny_model("lavin")
    perturb(model, seed=5)
    folder = save_adapter(model, tiny_config("lavin"), tmp_path / "adapter")
    blank_image.save(tmp_path / "picture.png")
    script = tmp_path / "turns.txt"
    turns = [f"/image {tmp_path / 'picture.png'}", *QUESTIONS, "/reset", QUESTIONS[0], "/quit", "Not asked."]
    script.write_text("\n".join(turns) + "\n")
    recorded: list[list[int]] = []

    def counted(*args, **kwargs) -> ChatSession:
        session = load_chat(*args, **kwargs)
        recorded.append(forward_lengths(session.model))
        return session

    monkeypatch.setattr("mma.chat.load_chat", counted)  # chat_command imports it when a session starts
    main(["chat", "--adapter", str(folder), "--script", str(script), "--max-new-tokens", "4"])
    printed = [line.strip() for line in capsys.readouterr().out.splitlines()]
    [lengths] = recorded
    assert sum(n > 1 for n in lengths) == 4  # one prefill per turn: three, then one after /reset
    session = load_chat(folder, max_new_tokens=4)  # no chat template on the byte tokenizer: plain
    session.reset(blank_image)
    expected = [session.ask(question) for question in QUESTIONS]
    assert printed == [*expected, expected[0]]
