"""ScienceQA: loading and bad data, prompt formats, answer parsing, the official table.

Fixtures are generated in ScienceQA's schema; tests that read the real 150-problem sample beside the repository
(../shared/data/scienceqa-sample) skip when it is absent.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from mma.data.scienceqa import (
    OFFICIAL_COLUMNS,
    ScienceQA,
    ScienceQADataModule,
    load_problems,
    official_groups,
    split_ids,
)
from mma.errors import ConfigError, DataError
from mma.evaluate import (
    markdown_table,
    parse_answer,
    read_predictions,
    rescore_scienceqa,
    resolve_unparseable,
    write_predictions,
)
from mma.metrics import GroupedAccuracy, choices_by_normalisation, option_scores

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="ScienceQA sample not beside the repository")


def _problem(**fields) -> dict:
    base = {
        "question": "Which is a mammal?",
        "choices": ["frog", "whale", "shark"],
        "answer": 1,
        "hint": "",
        "image": None,
        "task": "closed choice",
        "grade": "grade4",
        "subject": "natural science",
        "topic": "biology",
        "category": "Classification",
        "skill": "",
        "lecture": "Mammals feed milk.\nMost live on land.",
        "solution": "A whale is a mammal.",
        "split": "train",
    }
    return {**base, **fields}


def _write(root: Path, problems: dict, splits: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return root


def _dataset(
    root: Path, split: str = "train", missing: str = "error", mode: str = "train", fmt: str = "QCM-ALE", style="letter"
):
    problems, splits = load_problems(root)
    return ScienceQA(root, problems, split_ids(problems, splits, split, root), split, fmt, style, False, missing, mode)


def test_category_rules_and_table_match_a_hand_computation():
    """The official evaluation (ScienceQA's models/evaluate_acc / LaVIN eval.py) tags each problem:

    res_pd.loc[index, 'no_context'] = True if (not row['hint'] and not row['image']) else False
    res_pd.loc[index, 'has_text'] = True if row['hint'] else False
    res_pd.loc[index, 'has_image'] = True if row['image'] else False
    'acc_natural': get_acc_with_contion(res_pd, 'subject', 'natural science'),
    'acc_social': get_acc_with_contion(res_pd, 'subject', 'social science'),
    'acc_language': get_acc_with_contion(res_pd, 'subject', 'language science'),
    'acc_grade_1_6': get_acc_with_contion(res_pd, 'grade', ['grade1', ..., 'grade6']),
    'acc_grade_7_12': get_acc_with_contion(res_pd, 'grade', ['grade7', ..., 'grade12']),
    acc_average = len(res_pd[res_pd['true_false'] == True]) / num * 100
    """
    problems = [
        _problem(subject="natural science", hint="a hint", image="image.png", grade="grade2"),  # right
        _problem(subject="natural science", hint="", image=None, grade="grade8"),  # wrong
        _problem(subject="social science", hint="", image="image.png", grade="grade6"),  # right
        _problem(subject="language science", hint="text", image=None, grade="grade12"),  # right
        _problem(subject="social science", hint="", image=None, grade="grade7"),  # wrong
    ]
    correct = torch.tensor([True, False, True, True, False])
    assert official_groups(problems[0]) == ["NAT", "TXT", "IMG", "G1-6", "Avg"]
    assert official_groups(problems[1]) == ["NAT", "NO", "G7-12", "Avg"]
    metric = GroupedAccuracy(OFFICIAL_COLUMNS)
    metric.update(correct, [official_groups(p) for p in problems])
    scores = {k: float(v) for k, v in metric.compute().items()}
    # NAT 1/2, SOC 1/2, LAN 1/1, TXT 2/2, IMG 2/2, NO 0/2, G1-6 2/2, G7-12 1/3, Avg 3/5
    expected = [0.5, 0.5, 1.0, 1.0, 1.0, 0.0, 1.0, 1 / 3, 0.6]
    assert [scores[c] for c in OFFICIAL_COLUMNS] == pytest.approx(expected)
    assert markdown_table(OFFICIAL_COLUMNS, scores).splitlines()[2] == (
        "| 50.00 | 50.00 | 100.00 | 100.00 | 100.00 | 0.00 | 100.00 | 33.33 | 60.00 |"
    )


@needs_sample
@pytest.mark.parametrize("fmt", ["CQM-A", "QCM-A", "QCM-ALE", "QCM-LEA"])
def test_prompt_formats_pin_the_exact_text_of_a_real_problem(fmt):
    """Expectations are spelled out from the problem's fields (LaVIN's layout: Response:, \\n escaped)."""
    problems, _ = load_problems(SAMPLE)
    pid = "1"
    p = problems[pid]
    sample = _dataset(SAMPLE, "train", "text_only", fmt=fmt)[0]
    assert sample["pid"] == pid
    options = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(p["choices"]))
    context = p["hint"] or "N/A"
    lecture, solution = p["lecture"].replace("\n", "\\n"), p["solution"].replace("\n", "\\n")
    letter = "ABCDE"[p["answer"]]
    inputs = {
        "CQM": f"Context: {context}\nQuestion: {p['question']}\nOptions: {options}\nResponse:",
        "QCM": f"Question: {p['question']}\nContext: {context}\nOptions: {options}\nResponse:",
    }
    outputs = {
        "A": f"The answer is {letter}.",
        "ALE": f"The answer is {letter}. BECAUSE: {lecture} {solution}",
        "LEA": f"{lecture} {solution} The answer is {letter}.",
    }
    inp, out = fmt.split("-")
    assert sample["prompt"] == inputs[inp].replace("  ", " ")
    assert sample["answer"] == outputs[out].replace("  ", " ")


@needs_sample
def test_the_real_sample_loads_and_missing_images_are_handled():
    problems, splits = load_problems(SAMPLE)
    assert len(problems) == 150
    with pytest.raises(DataError, match=r"problem \d+: image .*images/train/\d+/image.png is missing"):
        _dataset(SAMPLE, "train")
    assert len(_dataset(SAMPLE, "train", "text_only")) == 50
    skipped = _dataset(SAMPLE, "train", "skip")
    assert len(skipped) == 50 - sum(1 for pid in splits["train"] if problems[pid]["image"])
    test = _dataset(SAMPLE, "test", mode="score")
    assert sum(test[i]["image"] is not None for i in range(len(test))) == 24


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"answer": 3}, "problem 7: answer index 3 out of range for 3 choices"),
        ({"choices": []}, "problem 7: has no choices"),
        ({"choices": [str(i) for i in range(27)], "answer": 0}, "problem 7: 27 choices, at most 26"),
    ],
)
def test_malformed_problems_are_named(tmp_path, fields, message):
    root = _write(tmp_path, {"7": _problem(**fields)}, {"train": ["7"]})
    with pytest.raises(DataError, match=message):
        load_problems(root)


def test_unknown_split_is_named(tmp_path):
    root = _write(tmp_path, {"7": _problem()}, {"train": ["7"]})
    with pytest.raises(DataError, match="unknown split 'minitrain'; splits: \\['train'\\]"):
        _dataset(root, "minitrain")


def test_images_are_read_from_the_official_layout(tmp_path):
    root = _write(tmp_path, {"7": _problem(image="image.png")}, {"train": ["7"]})
    (root / "images" / "train" / "7").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "images" / "train" / "7" / "image.png")
    assert _dataset(root)[0]["image"].getpixel((0, 0)) == (255, 0, 0)


def test_answer_parsing_and_the_unparseable_policy():
    choices = ["frog", "whale", "shark"]
    assert parse_answer("The answer is B. BECAUSE: whales feed milk", choices) == 1
    assert parse_answer("The answer is whale.", choices) == 1
    assert parse_answer("The answer is D.", choices) is None
    assert parse_answer("I think whale", choices) is None
    assert resolve_unparseable(None, 3, "wrong", random.Random(0)) == -1
    assert resolve_unparseable(None, 3, "random", random.Random(0)) == random.Random(0).randrange(3)


def test_prediction_file_of_another_split_is_refused(tmp_path):
    path = tmp_path / "predictions.json"
    write_predictions(path, "val", [{"pid": "7", "predicted": 1, "text": "The answer is B."}], {})
    with pytest.raises(DataError, match="predictions are for split 'val', not 'test'"):
        read_predictions(path, "test", ["7"])
    assert read_predictions(path, "val", ["7"]) == {"7": 1}
    with pytest.raises(DataError, match="do not cover split 'val'"):
        read_predictions(path, "val", ["7", "8"])


def test_rescore_a_predictions_file(tmp_path):
    root = _write(tmp_path / "data", {"7": _problem(), "8": _problem(answer=0)}, {"test": ["7", "8"]})
    path = tmp_path / "predictions.json"
    write_predictions(
        path, "test", [{"pid": "7", "predicted": 1, "text": ""}, {"pid": "8", "predicted": -1, "text": ""}], {}
    )
    scores = rescore_scienceqa(ScienceQADataModule(root=str(root)), path)
    assert scores["Avg"] == 0.5 and scores["NAT"] == 0.5 and scores["NO"] == 0.5


def test_fit_and_test_write_predictions_and_the_table(tmp_path):
    from conftest import tiny_config, tiny_trainer

    from mma.module import MMAModule

    problems = {
        str(i): _problem(split="train" if i < 4 else "test", image="image.png" if i % 2 else None) for i in range(6)
    }
    root = _write(tmp_path / "data", problems, {"train": ["0", "1", "2", "3"], "val": ["4"], "test": ["4", "5"]})
    for pid, problem in problems.items():
        if problem["image"]:
            (root / "images" / problem["split"] / pid).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(root / "images" / problem["split"] / pid / "image.png")
    data = ScienceQADataModule(root=str(root), prompt_format="QCM-A", batch_size=2, eval_batch_size=2)
    module = MMAModule(tiny_config(), max_length=384, max_new_tokens=4)
    trainer = tiny_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    assert set(f"test/{c}" for c in OFFICIAL_COLUMNS) <= set(results)
    predictions = json.loads((tmp_path / "predictions_test.json").read_text())
    assert predictions["split"] == "test" and set(predictions["predictions"]) == {"4", "5"}
    no_answer = sum(p["answer"] is None for p in predictions["predictions"].values())
    assert results["test/unparseable"] == no_answer  # counted wrong, never silently replaced
    assert (tmp_path / "results_test.md").read_text().count("|") > 10


def test_a_short_wrong_option_wins_the_sum_and_loses_the_mean():
    """Rows 0-1 are one problem: "no" (wrong, 1 token at -2.0) against "a long right answer" (4 tokens at -1.0)."""
    logprobs = torch.tensor([-2.0, -1.0, -1.0, -1.0, -1.0])
    rows = torch.tensor([0, 1, 1, 1, 1])
    chars = torch.tensor([2, 19])
    assert option_scores(logprobs, rows, 2, "sum", chars).tolist() == [-2.0, -4.0]
    assert option_scores(logprobs, rows, 2, "mean", chars).tolist() == [-2.0, -1.0]
    assert option_scores(logprobs, rows, 2, "char", chars).tolist() == pytest.approx([-1.0, -4 / 19])
    chosen = choices_by_normalisation(logprobs, rows, torch.tensor([0, 0]), chars)
    assert {name: c.tolist() for name, c in chosen.items()} == {"sum": [0], "mean": [1], "char": [1]}


def test_summed_option_scores_are_the_models_sequence_logprobs():
    from conftest import collator_for, tiny_model

    model = tiny_model("lavin")
    samples = [{"prompt": "Which is a mammal?", "image": None, "candidates": ["frog", "a large whale"]}]
    collate = collator_for(model)
    batch = collate(samples)
    assert batch["option_chars"].tolist() == [4, 13]
    logprobs, rows = model.option_logprobs(batch)
    summed = option_scores(logprobs, rows, 2, "sum", batch["option_chars"])
    per_option = collate(
        [{"prompt": "Which is a mammal?", "image": None, "answer": a} for a in ("frog", "a large whale")]
    )
    torch.testing.assert_close(summed, model.sequence_logprobs(per_option), rtol=0, atol=1e-4)
    counts = (per_option["labels"] != -100).sum(1).float()  # the option's tokens and EOS
    torch.testing.assert_close(option_scores(logprobs, rows, 2, "mean", batch["option_chars"]), summed / counts)


def test_cloze_prompt_lists_no_options_and_scores_their_texts(tmp_path):
    root = _write(tmp_path, {"7": _problem(hint="Whales live in the sea.")}, {"train": ["7"]})
    sample = _dataset(root, mode="score", fmt="cloze")[0]
    assert sample["prompt"] == "Question: Whales live in the sea.\nWhich is a mammal?\nAnswer:"
    assert sample["candidates"] == ["frog", "whale", "shark"]
    assert _dataset(root, fmt="cloze")[0]["answer"] == "whale"
    no_hint = _write(tmp_path / "b", {"7": _problem()}, {"train": ["7"]})
    assert _dataset(no_hint, mode="score", fmt="cloze")[0]["prompt"] == "Question: Which is a mammal?\nAnswer:"
    with pytest.raises(ConfigError, match="cloze lists no options"):
        ScienceQADataModule(root=str(root), prompt_format="cloze")


def test_unavailable_columns_say_so():
    row = markdown_table(("NAT", "IMG", "Avg"), {"NAT": float("nan"), "IMG": float("nan"), "Avg": 0.5}, ("NAT",))
    assert row.splitlines()[2] == "| n/a | - | 50.00 |"


def test_scored_test_reports_every_normalisation(tmp_path):
    from conftest import tiny_config, tiny_trainer

    from mma.module import MMAModule

    root = _write(tmp_path / "data", {str(i): _problem(answer=i % 3) for i in range(4)}, {"test": ["0", "1", "2", "3"]})
    data = ScienceQADataModule(
        root=str(root), prompt_format="cloze", evaluation="score", score_normalisation="sum", eval_batch_size=3
    )
    module = MMAModule(tiny_config(), max_length=384)
    results = tiny_trainer(default_root_dir=tmp_path).test(module, datamodule=data, verbose=False)[0]
    assert results["test/Avg"] == results["test/Avg@sum"]
    assert {"test/Avg@mean", "test/Avg@char"} <= set(results)
    assert "normalisation sum (Avg under sum" in (tmp_path / "results_test.md").read_text()


def test_lengths_count_what_each_mode_puts_in_a_row(tmp_path):
    """Training rows hold prompt and target, scoring rows the prompt and every candidate, generation the prompt."""
    root = _write(tmp_path, {"1": _problem(hint="A hint.")}, {"train": ["1"]})
    lengths = {
        mode: _dataset(root, mode=mode, fmt="CQM-A").text_lengths()[0] for mode in ("train", "score", "generate")
    }
    sample = {mode: _dataset(root, mode=mode, fmt="CQM-A")[0] for mode in ("train", "score")}
    prompt = len(sample["train"]["prompt"])
    assert lengths["train"] == prompt + len(sample["train"]["answer"]) and lengths["generate"] == prompt
    assert lengths["score"] == prompt + sum(len(c) + 1 for c in sample["score"]["candidates"])


def test_scored_predictions_do_not_depend_on_the_evaluation_order(tmp_path):
    """Longest-first evaluation batches (``group_by_length``) choose what dataset-order batches choose."""
    from conftest import tiny_config, tiny_trainer

    from mma.module import MMAModule

    hints = ["", "A long hint about the animals of the sea and the land. " * 3, "Short.", "Medium hint, twice. " * 2]
    problems = {str(i): _problem(answer=i % 3, hint=hint) for i, hint in enumerate(hints)}
    root = _write(tmp_path / "data", problems, {"test": list(problems)})
    module = MMAModule(tiny_config(), max_length=384)
    chosen = []
    for grouped in (True, False):
        data = ScienceQADataModule(root=str(root), evaluation="score", eval_batch_size=2, group_by_length=grouped)
        out = tmp_path / f"grouped-{grouped}"
        tiny_trainer(default_root_dir=out).test(module, datamodule=data, verbose=False)
        chosen.append(json.loads(next(out.glob("predictions_*.json")).read_text()))
    assert chosen[0] == chosen[1]


def test_memvps_evaluation_gives_the_answer_prefix_and_reads_one_token(monkeypatch):
    """``answer_prefix``: every prompt ends with `` The answer is`` (tokenised as a training answer starts), the
    model decodes ``max_new_tokens`` tokens, and the parser reads the prefix in front of them; an answer without a
    letter counts wrong."""
    from conftest import collator_for, tiny_config

    from mma.data.base import Evaluation
    from mma.module import MMAModule

    module = MMAModule(tiny_config(), max_length=384, max_new_tokens=1)
    module.configure_model()
    module.evaluation, module.fallback_rng, module._unparseable = Evaluation(answer_prefix="The answer is"), None, 0
    model, prompts = module.model, ["Which? (A) frog (B) whale", "Which is a mammal? (A) frog (B) whale"]
    batch = collator_for(model)([{"prompt": prompt, "image": None, "answer": None} for prompt in prompts])
    batch["choices"] = [["frog", "whale"]] * 2
    seen, letter = {}, model.tokenizer(" B", add_special_tokens=False).input_ids

    def generate(given: dict, max_new_tokens: int) -> list[list[int]]:
        seen.update(given, max_new_tokens=max_new_tokens)
        return [letter, []]

    monkeypatch.setattr(model, "generate", generate)
    chosen, texts, _ = module._choose(batch)
    prefix = model.tokenizer(" The answer is", add_special_tokens=False).input_ids
    assert seen["max_new_tokens"] == 1
    assert seen["input_ids"][:, len(batch["input_ids"][0]) :].tolist() == [prefix, prefix]
    assert torch.equal(seen["input_ids"][:, : len(batch["input_ids"][0])], batch["input_ids"])
    assert seen["attention_mask"][:, len(batch["input_ids"][0]) :].all()
    assert texts == ["The answer is B", "The answer is"] and chosen.tolist() == [1, -1]
    with pytest.raises(ConfigError, match="answer_prefix starts generated answers: it needs evaluation: generate"):
        ScienceQADataModule(answer_prefix="The answer is", evaluation="score")
