import pytest
from PIL import Image

from mma.data.datamodule import SyntheticVQA
from mma.data.images import load_image
from mma.data.prompts import answer_text, question_prompt
from mma.data.synthetic import QUESTION_TYPES, make_problem
from mma.errors import DataError


def test_undecodable_and_missing_images_are_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    with pytest.raises(DataError, match="broken.png' cannot be decoded"):
        load_image(broken)
    with pytest.raises(DataError, match="missing.png' does not exist"):
        load_image(tmp_path / "missing.png")
    good = tmp_path / "good.png"
    Image.new("L", (4, 4)).save(good)
    assert load_image(good).mode == "RGB"


def test_synthetic_problems_are_deterministic_and_cover_every_type():
    first = [make_problem(0, i, 32, 0.75) for i in range(200)]
    second = [make_problem(0, i, 32, 0.75) for i in range(200)]
    assert [(p.question, p.choices, p.answer) for p in first] == [(p.question, p.choices, p.answer) for p in second]
    assert all(a.image is None or a.image.tobytes() == b.image.tobytes() for a, b in zip(first, second, strict=True))
    assert {p.category for p in first} == set(QUESTION_TYPES)
    assert all(p.choices[p.answer] not in p.choices[: p.answer] for p in first)


def test_synthetic_splits_differ_and_blind_images_are_blank():
    train = SyntheticVQA("train", 50, 0, 32, 1.0, "text")
    test = SyntheticVQA("test", 50, 0, 32, 1.0, "text")
    assert [train[i]["prompt"] for i in range(50)] != [test[i]["prompt"] for i in range(50)]
    blind = SyntheticVQA("test", 50, 0, 32, 1.0, "text", blind=True)
    assert blind[3]["prompt"] == test[3]["prompt"] and blind[3]["target"] == test[3]["target"]
    assert len(set(blind[3]["image"].getdata())) == 1


def test_prompt_and_answer_text():
    assert (
        question_prompt("What colour?", ["red", "blue"])
        == "Question: What colour?\nOptions: (A) red (B) blue\nResponse:"
    )
    assert (
        question_prompt("Q?", ["x", "y"], context="") == "Question: Q?\nContext: N/A\nOptions: (A) x (B) y\nResponse:"
    )
    assert answer_text(["red", "blue"], 1, "letter") == "The answer is B."
    assert answer_text(["red", "blue"], 1, "text") == "The answer is blue."
