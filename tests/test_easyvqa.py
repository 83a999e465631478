"""easy-VQA from the installed package: counts, splits, the stratified test subset, the blind control, collation,
errors, and a short Lightning run on the tiny backbones."""

import sys
from collections import Counter

import pytest
from conftest import tiny_config, tiny_trainer
from timm.data import create_transform

from mma.backbones.tokenizer import byte_tokenizer
from mma.data import EasyVQA, EasyVQADataModule
from mma.data.collate import VLMCollator
from mma.data.easyvqa import OPTIONS, read_split, stratified_subset
from mma.errors import ConfigError, DataError
from mma.layout import SequenceLayout

easy_vqa = pytest.importorskip("easy_vqa", reason="easy-vqa is not installed: pip install --no-deps easy-vqa==1.0")

# easy-vqa 1.0, counted once from its questions.json files (yes/no counts as its README states).
TRAIN_TYPES = {"yes/no": 28407, "shape": 5002, "colour": 5166}
TEST_TYPES = {"yes/no": 7136, "shape": 1257, "colour": 1280}


@pytest.fixture(scope="module")
def data() -> EasyVQADataModule:
    module = EasyVQADataModule(val_images=200, test_size=1200)
    module.setup("fit")
    module.setup("test")
    return module


def test_counts_and_types_match_the_package():
    train, test = read_split("train"), read_split("test")
    assert len(train) == len(easy_vqa.get_train_questions()[0]) == 38575
    assert len(test) == len(easy_vqa.get_test_questions()[0]) == 9673
    assert Counter(q.kind for q in train) == TRAIN_TYPES
    assert Counter(q.kind for q in test) == TEST_TYPES
    assert {a for options in OPTIONS.values() for a in options} == set(easy_vqa.get_answers())


def test_validation_pictures_are_never_trained_on(data):
    train_images = {q.image_id for q in data.train_set.questions}
    val_images = {q.image_id for q in data.val_set.questions}
    assert len(val_images) == 200 and not train_images & val_images
    assert len(data.train_set) + len(data.val_set) == 38575


@pytest.mark.parametrize("kind", OPTIONS)
def test_options_per_type_and_the_target_is_the_answer(data, kind):
    index = next(i for i, q in enumerate(data.val_set.questions) if q.kind == kind)
    question, sample = data.val_set.questions[index], data.val_set[index]
    assert len(sample["candidates"]) == {"yes/no": 2, "shape": 3, "colour": 8}[kind]
    assert sample["candidates"][sample["target"]] == f"The answer is {question.answer}."
    assert sample["groups"] == [kind, "all"] and sample["prompt"].endswith("\nResponse:")
    train = EasyVQA([question], "lavin", evaluate=False)[0]
    assert train["answer"] == f"The answer is {question.answer}." and set(train) == {"prompt", "image", "answer"}
    llava = EasyVQA([question], "llava", evaluate=True)[0]
    assert llava["prompt"] == f"{question.text}\nAnswer the question using a single word or phrase."
    assert llava["candidates"] == list(OPTIONS[kind]) and llava["candidates"][llava["target"]] == question.answer


def test_balanced_training_has_equally_many_questions_of_each_type(data):
    """easy-vqa's training questions are 74% yes/no: balance_types trains on a seeded subset of each type the
    size of the rarest type, never touching the validation pictures."""
    module = EasyVQADataModule(val_images=200, balance_types=True)
    module.setup("fit")
    counts = Counter(q.kind for q in module.train_set.questions)
    assert len(set(counts.values())) == 1
    assert counts["shape"] == Counter(q.kind for q in data.train_set.questions)["shape"]
    assert {q.pid for q in module.train_set.questions} < {q.pid for q in data.train_set.questions}
    again = EasyVQADataModule(val_images=200, balance_types=True)
    again.setup("fit")
    assert [q.pid for q in again.train_set.questions] == [q.pid for q in module.train_set.questions]


def test_the_test_subset_is_fixed_stratified_and_sized(data):
    again = EasyVQADataModule(test_size=1200)
    again.setup("test")
    assert [q.pid for q in again.test_questions] == [q.pid for q in data.test_questions]
    counts = Counter(q.kind for q in data.test_questions)
    assert sum(counts.values()) == 1200
    for kind, total in TEST_TYPES.items():
        assert abs(counts[kind] - total * 1200 / 9673) < 1
    other = stratified_subset(read_split("test"), 1200, seed=1)
    assert [q.pid for q in other] != [q.pid for q in data.test_questions]
    everything = EasyVQADataModule(test_size=None)
    everything.setup("test")
    assert len(everything.test_questions) == 9673


def test_the_blind_control_asks_the_same_questions_over_blank_pictures(data):
    seeing, blind = data.test_set(), data.test_set(blind=True)
    for index in (0, 500, 1199):
        a, b = seeing[index], blind[index]
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
        assert b["image"].size == a["image"].size == (64, 64)
        assert all(low == high for low, high in b["image"].getextrema())  # one colour
        assert any(low != high for low, high in a["image"].getextrema())


def test_collation_scores_every_option_after_one_prompt(data):
    kinds = {q.kind: i for i, q in enumerate(data.val_set.questions)}  # one question of each type
    samples = [data.val_set[i] for i in kinds.values()]
    collate = VLMCollator(
        byte_tokenizer(), create_transform(input_size=(3, 32, 32)), SequenceLayout(modality_token=True), 4
    )
    batch = collate(samples)
    assert batch["input_ids"].shape[0] == batch["pixel_values"].shape[0] == 3  # one row and picture per question
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)
    assert batch["sample_index"].bincount().tolist() == [len(s["candidates"]) for s in samples]
    assert batch["segment_ids"].amax(dim=1).tolist() == [len(s["candidates"]) for s in samples]
    assert batch["target"] == [s["target"] for s in samples]


def test_a_missing_picture_is_named(monkeypatch, tmp_path):
    listed = easy_vqa.get_train_image_paths()
    monkeypatch.setattr(easy_vqa, "get_train_image_paths", lambda: {**listed, 17: str(tmp_path / "17.png")})
    with pytest.raises(DataError, match=r"17\.png is missing; reinstall the package: pip install --no-deps easy"):
        EasyVQADataModule().setup("fit")
    monkeypatch.setattr(easy_vqa, "get_train_image_paths", lambda: {k: v for k, v in listed.items() if k != 17})
    with pytest.raises(DataError, match=r"train/images/17\.png is missing"):
        read_split("train")


def test_a_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # makes ``import easy_vqa`` fail
    with pytest.raises(DataError, match="pip install --no-deps easy-vqa==1.0"):
        read_split("test")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"val_images": 0}, r"val_images=0 must be in \[1, 3999\]"),
        ({"val_images": 4000}, "val_images=4000"),
        ({"test_size": 0}, r"test_size=0 must be in \[1, 9673\]"),
        ({"test_size": 9674}, "test_size=9674"),
        ({"train_size": 0}, "train_size=0 must be at least 1"),
        ({"prompt_style": "chat"}, "prompt_style='chat'"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        EasyVQADataModule(**settings)


def test_train_and_test_through_lightning(tmp_path):
    from mma.module import MMAModule

    data = EasyVQADataModule(val_images=1, test_size=4, train_size=8, batch_size=4, eval_batch_size=2)
    module = MMAModule(tiny_config(), max_length=256)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    assert trainer.global_step == 2
    assert {f"{name}/{group}" for name in ("test", "blind") for group in data.evaluation().groups} <= set(results)
