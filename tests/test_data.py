import pytest
import torch
from PIL import Image

from mma.data import SyntheticVQADataModule
from mma.data.base import (
    EpochSampler,
    JointDataset,
    LengthBudgetBatchSampler,
    LengthGroupedSampler,
    LengthSortedSampler,
    SourceBatchSampler,
    row_chars,
)
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


def _batches(sampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch) for batch in batches)


def test_length_grouped_batches_hold_neighbouring_lengths_longest_first():
    lengths = torch.randperm(400, generator=torch.Generator().manual_seed(0)).add(1).tolist()  # 1..400, shuffled
    sampler = LengthGroupedSampler(lengths, seed=0, batch_size=8, mega_batches=50)  # one mega-batch: all of it
    batches = _batches(sampler, 8)
    assert sorted(i for batch in batches for i in batch) == list(range(400))
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert spans == [7] * 50  # each batch: 8 consecutive lengths
    assert max(lengths[i] for i in batches[0]) == 400
    assert batches[1:] != sorted(batches[1:], key=lambda b: -lengths[b[0]])  # the rest are shuffled
    small = LengthGroupedSampler(lengths, seed=0, batch_size=8, mega_batches=5)
    random_order = _padding(_batches(EpochSampler(400, seed=0), 8), lengths)
    assert _padding(_batches(small, 8), lengths) < random_order / 4


def test_length_grouped_epochs_differ_and_a_resumed_epoch_continues_with_the_same_batches():
    lengths = [(7 * i) % 50 for i in range(203)]  # an incomplete last batch
    sampler = LengthGroupedSampler(lengths, seed=3, batch_size=4, mega_batches=3)
    sampler.set_epoch(1)
    first = _batches(sampler, 4)
    assert len(first) == 51 and len(first[-1]) == 3
    sampler.skip = 5 * 4
    assert _batches(sampler, 4) == first[5:]
    assert _batches(sampler, 4) == first  # the skip applies to one pass only
    sampler.set_epoch(2)
    assert _batches(sampler, 4) != first


def test_length_grouped_ranks_partition_each_step_of_the_single_process_order():
    """Rank r takes positions r, r + n, ... : the ranks' batches of b together are the single-process batches
    of n * b, so each step's batches come from the same length group."""
    lengths = [(13 * i) % 97 for i in range(250)]
    single = _batches(LengthGroupedSampler(lengths, seed=1, batch_size=3 * 4, mega_batches=4), 3 * 4)
    ranks = [_batches(LengthGroupedSampler(lengths, 1, 4, 4, num_replicas=3, rank=r), 4) for r in range(3)]
    steps = [sorted(i for batch in together for i in batch) for together in zip(*ranks, strict=True)]
    assert len(steps) == len(single) == 21
    assert steps[:-1] == [sorted(batch) for batch in single[:-1]]
    assert set(single[-1]) <= set(steps[-1])  # the last step: 10 samples and 2 repeated to fill the ranks
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert set(seen) == set(range(250)) and len(seen) == 252  # padded by repeating the start, as EpochSampler


def test_data_modules_group_by_length_when_the_dataset_reports_lengths():
    module = SyntheticVQADataModule(train_size=40, batch_size=4)
    module.trainer = type("Trainer", (), {"world_size": 1, "global_rank": 0})()
    questions = SyntheticVQA("train", 40, 0, 32, 0.75, "text")
    assert questions.text_lengths() == [
        len(s["prompt"]) + len(s["answer"]) for s in map(questions.__getitem__, range(40))
    ]
    assert isinstance(module.train_sampler(questions, 1, 0), LengthGroupedSampler)
    joint = JointDataset({"instruction": questions, "caption": SyntheticCaptions(8, 0, 32)})
    assert isinstance(module.train_sampler(joint, 1, 0), LengthGroupedSampler)
    assert type(module.train_sampler([{"prompt": "x"}] * 8, 1, 0)) is EpochSampler  # no lengths reported
    assert type(SyntheticVQADataModule(group_by_length=False).train_sampler(questions, 1, 0)) is EpochSampler


def test_evaluation_runs_longest_first_when_the_dataset_reports_lengths():
    assert list(LengthSortedSampler([5, 9, 1, 9, 3])) == [1, 3, 0, 4, 2]  # ties keep dataset order
    questions = SyntheticVQA("test", 40, 0, 32, 0.75, "text")
    module = SyntheticVQADataModule(eval_batch_size=4)
    module.set_collator(list)
    batches = list(module.eval_loader(questions).batch_sampler)
    order = [i for batch in batches for i in batch]
    assert sorted(order) == list(range(40))
    assert [questions.text_lengths()[i] for i in order] == sorted(questions.text_lengths(), reverse=True)
    in_order = SyntheticVQADataModule(eval_batch_size=4, group_by_length=False)
    in_order.set_collator(list)
    assert list(in_order.eval_loader(questions).sampler) == list(range(40))
    assert len(module.eval_loader(SyntheticVQA("test", 0, 0, 32, 0.75, "text"))) == 0  # empty: no median, no batch


def test_evaluation_batches_hold_the_median_length_times_the_batch_size():
    """Long samples go few to a batch and short ones many; no batch pads past the budget unless it holds one."""
    assert list(LengthBudgetBatchSampler([5, 9, 1, 9, 3, 2, 2], budget=10)) == [[1], [3], [0, 4], [5, 6, 2]]
    lengths = [300, 40, 41, 38, 120, 39, 35, 36, 37, 90]
    batches = list(LengthBudgetBatchSampler.median_sized(lengths, 4))  # budget 4 x 39.5
    assert [len(batch) for batch in batches] == [1, 1, 1, 3, 4]
    assert all(len(b) * lengths[b[0]] <= 4 * 39.5 or len(b) == 1 for b in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(10))


def test_scoring_rows_report_every_candidate():
    """A scored sample's row holds its prompt and every candidate, a training row its answer."""
    questions = SyntheticVQA("test", 6, 0, 32, 0.75, "text")
    samples = [questions[i] for i in range(6)]
    assert questions.text_lengths() == [len(s["prompt"]) + sum(len(c) + 1 for c in s["candidates"]) for s in samples]
    assert row_chars("ab", "cde") == 5 and row_chars("ab", candidates=["c", "de"]) == 7
