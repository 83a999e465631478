import pytest
from PIL import Image

from mma.data import SyntheticVQADataModule
from mma.data.base import EpochSampler, JointDataset, SourceBatchSampler
from mma.data.datamodule import SyntheticCaptions, SyntheticVQA
from mma.data.images import load_image
from mma.data.prompts import answer_text, question_prompt
from mma.data.synthetic import COUNTS, QUESTION_TYPES, make_problem
from mma.errors import ConfigError, DataError


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


def test_joint_batches_hold_one_source_in_the_mixing_ratio_and_resume_by_batch():
    joint = JointDataset({"instruction": [{"i": i} for i in range(300)], "caption": [{"i": i} for i in range(100)]})
    assert joint.sources() == [0] * 300 + [1] * 100
    batches = SourceBatchSampler(EpochSampler(len(joint), seed=0), joint.sources(), batch_size=8)
    order = list(batches)
    assert len(order) == len(batches) == 300 // 8 + 100 // 8
    assert all(len({joint.sources()[i] for i in batch}) == 1 for batch in order)
    assert sum(joint.sources()[batch[0]] for batch in order) == 100 // 8  # caption batches: a quarter
    batches.skip = 5
    assert list(batches) == order[5:]
    assert list(batches) == order  # the skip applies to one pass only
    assert joint[300] == {"i": 0, "source": "caption"} and joint[299] == {"i": 299, "source": "instruction"}


def test_captions_name_what_the_picture_shows_and_the_fraction_is_checked():
    captions = SyntheticCaptions(10, seed=0, image_size=32)
    again = SyntheticCaptions(10, seed=0, image_size=32)
    assert [captions[i]["answer"] for i in range(10)] == [again[i]["answer"] for i in range(10)]
    assert all(captions[i]["answer"].split()[0] in COUNTS and captions[i]["image"] for i in range(10))
    with pytest.raises(ConfigError, match=r"caption_fraction=1.0 must be in \[0, 1\)"):
        SyntheticVQADataModule(caption_fraction=1.0)
