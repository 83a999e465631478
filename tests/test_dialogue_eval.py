"""The measurements of two-stage conversation training on tiny models: forgetting (answer NLL), LaVIN's routers per
modality, accuracy per chat turn, and the printed tables."""

import json

import pytest
import torch
from conftest import collator_for, perturb, tiny_config, tiny_model
from PIL import Image

from mma.checkpoint import save_adapter
from mma.data.conversations import Conversation
from mma.data.dialogue_collate import ConversationCollator
from mma.dialogue_eval import (
    answer_nll,
    fitting,
    is_correct,
    main,
    rotations,
    router_inputs_and_experts,
    router_table,
    routing_weights,
    turn_accuracy,
)


def conversations(tmp_path, image: bool, count: int = 3) -> list[Conversation]:
    picture = tmp_path / "p.png"
    Image.new("RGB", (32, 32), (10, 160, 10)).save(picture)
    messages = ({"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "green"})
    return [Conversation(f"c{i}", messages * 2, picture if image else None) for i in range(count)]


def collator(model, max_length: int = 128) -> ConversationCollator:
    base = collator_for(model, max_length)
    base.transform = lambda picture: torch.zeros(3, 32, 32)
    return ConversationCollator(base, "plain")


def test_identity_adapters_forget_nothing_and_moved_ones_change_the_answers(tmp_path):
    texts = conversations(tmp_path, image=False)
    bare, fresh = tiny_model("none"), tiny_model("lavin")  # same backbones; LaVIN starts as the identity
    nll, tokens = answer_nll(bare, collator(bare), texts, batch_size=2)
    assert tokens == 3 * 2 * (len(" green") + 1)  # 3 conversations x 2 answers: a token per byte, then EOS
    assert answer_nll(fresh, collator(fresh), texts)[0] == pytest.approx(nll, abs=1e-5)
    perturb(fresh)
    assert answer_nll(fresh, collator(fresh), texts)[0] != pytest.approx(nll, abs=1e-3)


def test_models_are_compared_on_the_conversations_both_lay_out(tmp_path):
    model = tiny_model("none")
    short = conversations(tmp_path, image=False, count=1)
    long = [Conversation("long", ({"role": "user", "content": "Tell me. " * 8}, short[0].messages[1]))]
    roomy, tight = collator(model), collator(model, max_length=len(collator(model).sequence(_sample(short[0]))[0]))
    assert fitting([*long, *short], [roomy]) == [*long, *short]
    assert fitting([*long, *short], [roomy, tight]) == short


def _sample(conversation: Conversation) -> dict:
    return {"messages": list(conversation.messages), "image": None, "id": conversation.id}


def test_routers_are_read_per_modality(tmp_path):
    model = tiny_model("lavin")
    perturb(model)
    image = routing_weights(model, collator(model), conversations(tmp_path, image=True))
    text = routing_weights(model, collator(model), conversations(tmp_path, image=False))
    llm = [name for name in image if name.startswith("llm.")]
    assert len(llm) == 2 and len(image) == 4 and set(text) == set(llm)  # ViT routers see pictures only
    assert all(torch.allclose(w.sum(), torch.tensor(1.0)) for w in (*image.values(), *text.values()))
    assert not torch.allclose(image[llm[0]], text[llm[0]])  # the modality token routes them apart


def test_llm_routers_report_their_inputs_by_modality_and_their_experts():
    model = tiny_model("lavin")
    at_init = router_inputs_and_experts(model)
    assert len(at_init) == 2 and all(name.startswith("llm.") for name in at_init)
    assert all(-1 <= cosine < 0.999 and apart == 0.0 for cosine, apart in at_init.values())
    perturb(model)
    assert all(apart > 0 for _, apart in router_inputs_and_experts(model).values())
    table = router_table({name: torch.tensor([0.5, 0.5]) for name in at_init}, {}, at_init)
    assert [column.header for column in table.columns][-2:] == ["input cosine", "experts apart"]


def test_an_answer_is_right_when_it_names_the_gold_option_only():
    assert is_correct("Blue.", "blue") and is_correct("yes, there is", "yes")
    assert not is_correct("blue or red", "blue") and not is_correct("a circle", "rectangle")


class Scripted:
    """A stand-in session answering from a list, recording resets."""

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.resets = iter(answers), 0

    def reset(self, image) -> None:
        self.resets += 1

    def ask(self, text: str) -> str:
        return next(self.answers)


def test_turn_accuracy_scores_each_turn_of_each_session(tmp_path):
    dialogues = conversations(tmp_path, image=True, count=2)  # two turns each, gold "green"
    session = Scripted(["green", "red", "green", "green"])
    assert turn_accuracy(session, dialogues) == [1.0, 0.5] and session.resets == 2


def test_rotations_ask_every_question_at_every_turn(tmp_path):
    messages = tuple({"role": role, "content": f"{role} {i}"} for i in range(3) for role in ("user", "assistant"))
    rotated = rotations([Conversation("d", messages, tmp_path / "p.png")], turns=3)
    assert [c.id for c in rotated] == ["d@0", "d@1", "d@2"]
    assert [[m["content"] for m in c.messages[::2]] for c in rotated] == [
        ["user 0", "user 1", "user 2"],
        ["user 1", "user 2", "user 0"],
        ["user 2", "user 0", "user 1"],
    ]
    assert all(
        c.messages[1::2] == tuple(messages[2 * k + 1] for k in order)
        for c, order in zip(rotated, ([0, 1, 2], [1, 2, 0], [2, 0, 1]), strict=True)
    )  # answers travel with their questions
    assert all(c.image == tmp_path / "p.png" for c in rotated)


def test_the_tables_print_for_exported_adapters(tmp_path, capsys):
    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed")
    before = save_adapter(tiny_model("none"), tiny_config("none"), tmp_path / "before")
    model = tiny_model("lavin")
    perturb(model)
    after = save_adapter(model, tiny_config("lavin"), tmp_path / "after")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]))
    args = ["--adapter", str(after), "--before", str(before), "--alpaca", str(alpaca), "--alpaca-from", "2"]
    main([*args, "--pictures", "2", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "forgetting" in out and "LaVIN routers" in out and "LLM block 1" in out and "turn 2" in out
