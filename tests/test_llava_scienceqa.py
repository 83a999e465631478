"""ScienceQA in LLaVA's conversation files: each prompt style parsed structurally, bad files named, the random
fallback kept among a problem's own options, option scoring and the TXT / IMG / NO table.

The hand-written records follow LLaVA's converter (haotian-liu/LLaVA scripts/convert_sqa_to_llava.py and
convert_sqa_to_llava_base_prompt.py) and its evaluation file llava_test_CQM-A.json; a small converter below
rebuilds such files from the real 150-problem sample beside the repository (skipped when it is absent).
"""

import json
import random
import re
from pathlib import Path
from statistics import mean

import pytest
from PIL import Image

from mma.data.prompts import INPUT_FORMATS
from mma.data.scienceqa import (
    LLAVA_UNAVAILABLE,
    LLaVAScienceQA,
    ScienceQADataModule,
    llava_answer,
    llava_groups,
    load_problems,
    official_groups,
    parse_llava_turn,
)
from mma.errors import ConfigError, DataError
from mma.evaluate import parse_answer, resolve_unparseable

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa-sample"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="ScienceQA sample not beside the repository")


def _record(pid: str, human: str, gpt: str, image: bool = False) -> dict:
    record = {"id": pid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
    return {**record, "image": f"{pid}/image.png"} if image else record


# (record, options, answer index, groups) in each style; options with parentheses and multi-line fields included.
CQM_EVALUATION = [
    (
        _record(
            "1",
            "<image>\nContext: Select the best answer.\nWhich property do these objects have in common?\n"
            "A. flexible\nB. yellow\nC. sticky (like glue)",
            "C",
            image=True,
        ),
        ["flexible", "yellow", "sticky (like glue)"],
        2,
        ["TXT", "IMG", "Avg"],
    ),
    (
        _record("2", "Which word comes first in a dictionary?\nA. hound\nB. huge", "A"),
        ["hound", "huge"],
        0,
        ["NO", "Avg"],
    ),
    (
        _record(
            "3",
            "<image>\nWhich of these cities is marked on the map?\nA. Salt Lake City\nB. Provo\nC. Ogden\n"
            "D. Denver (CO)\nE. Boise",
            "D. Denver (CO)",
            image=True,
        ),
        ["Salt Lake City", "Provo", "Ogden", "Denver (CO)", "Boise"],
        3,
        ["IMG", "Avg"],
    ),
    (
        _record(
            "4",
            "Context: The text below is from a poem.\nA. Lincoln wrote it.\nWho wrote it?\nA. Abraham Lincoln\n"
            "B. Walt Whitman (1819-1892)",
            "B",
        ),
        ["Abraham Lincoln", "Walt Whitman (1819-1892)"],
        1,
        ["TXT", "Avg"],
    ),
]
QCM_LEA = [
    (
        _record(
            "5",
            "Which tense does the sentence use?\nMona will print her name (in ink).\nContext: N/A\n"
            "Options: (A) present tense (B) future tense (C) past tense (as in (a) yesterday)",
            "The future tense tells about something that is going to happen.\nWill print is in the future tense. "
            "The answer is B.",
        ),
        ["present tense", "future tense", "past tense (as in (a) yesterday)"],
        1,
        ["NO", "Avg"],
    ),
    (
        _record(
            "6",
            "Which animal's mouth is adapted to tear through meat?\nContext: Wolves are carnivores (meat eaters).\n"
            "Look at the picture.\nOptions: (A) gray wolf (Canis lupus) (B) cow (C) rabbit (D) sheep\n<image>",
            "Carnivores tear meat. The answer is A.",
            image=True,
        ),
        ["gray wolf (Canis lupus)", "cow", "rabbit", "sheep"],
        0,
        ["TXT", "IMG", "Avg"],
    ),
]
QCM_ALE = [
    (
        _record(
            "7",
            "Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale\n<image>",
            "The answer is B. BECAUSE: Mammals feed milk.",
            image=True,
        ),
        ["frog", "whale"],
        1,
        ["IMG", "Avg"],
    ),
    (
        _record("8", "Is (x) a variable?\nContext: In algebra, (x) is.\nOptions: (A) yes (B) no", "The answer is A."),
        ["yes", "no"],
        0,
        ["TXT", "Avg"],
    ),
]
CQM_CONVERTER = [
    (
        _record("9", "Context: N/A\nQuestion: Which is hot?\nOptions: (A) ice (B) fire (C) snow", "The answer is B."),
        ["ice", "fire", "snow"],
        1,
        ["NO", "Avg"],
    ),
]
QCLM_LEPA = [
    (
        _record(
            "10",
            "Which is a solid?\nContext: Look at the list.\nBECAUSE: Solids keep their shape.\nA solid can be hard.\n"
            "Options: (A) milk (B) rock (C) juice (D) air (E) steam",
            "LECTURE: Solids keep their shape.\n###\nANSWER: B.",
        ),
        ["milk", "rock", "juice", "air", "steam"],
        1,
        ["TXT", "Avg"],
    ),
]
STYLES = [("CQM", CQM_EVALUATION), ("QCM", QCM_LEA), ("QCM", QCM_ALE), ("CQM", CQM_CONVERTER), ("QCLM", QCLM_LEPA)]


def _write(folder: Path, records: list[dict], name: str = "llava.json", images: Path | None = None) -> Path:
    """``records`` as ``folder/name``, their images (8 px) under ``images`` (default: ``folder``)."""
    images = images or folder
    for record in records:
        if record.get("image"):
            (images / record["id"]).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(images / record["image"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(records))
    return folder / name


@pytest.mark.parametrize(("style", "cases"), STYLES)
def test_every_style_parses_to_the_written_options(tmp_path, style, cases):
    path = _write(tmp_path, [record for record, *_ in cases])
    found = LLaVAScienceQA(path, tmp_path, "generate")
    assert found.style == style
    given = LLaVAScienceQA(path, tmp_path, "score", answer_style="text", style=style)
    for i, (record, options, answer, groups) in enumerate(cases):
        sample = found[i]
        assert sample["choices"] == options and sample["target"] == answer and sample["groups"] == groups
        assert sample["prompt"] == record["conversations"][0]["value"].replace("<image>", "").strip()
        assert (sample["image"] is not None) == ("IMG" in groups)
        assert given[i]["candidates"] == [f"The answer is {option}." for option in options]
    train = LLaVAScienceQA(path, tmp_path, "train")[0]
    assert train["answer"] == cases[0][0]["conversations"][1]["value"]


def test_the_gpt_turn_answer_forms():
    assert llava_answer("The answer is C.") == "C"
    assert llava_answer("A lecture.\nThe answer is B.") == "B"
    assert llava_answer("The answer is A. BECAUSE: x") == "A"
    assert llava_answer("LECTURE: x\n###\nANSWER: D.") == "D"
    assert llava_answer("E") == "E" and llava_answer("B. whale") == "B"
    assert llava_answer("The answer is A. Or: The answer is B.") is None
    assert llava_answer("A whale.") is None


def test_parentheses_in_options_are_not_counted_as_options():
    turn = parse_llava_turn("Q?\nContext: N/A\nOptions: (A) a (b) (B) (c) or (d) (C) e)", "QCM")
    assert turn.options == ["a (b)", "(c) or (d)", "e)"]


@pytest.mark.parametrize(
    ("records", "style", "message"),
    [
        ([_record("1", "Q?\nContext: N/A\nOptions: (A) x (B) y", "The answer is C.")], None, "record '1': .*C"),
        (
            [_record("1", "Q?\nContext: N/A\nOptions: (A) x (B) y", "The answer is A."), _record("2", "Q?", "A")],
            None,
            "record '2': not in LLaVA's QCM",
        ),
        ([_record("3", "Q?\nContext: N/A\nOptions: (A) x (B) y", "A")], "CQM", "record '3': not in LLaVA's CQM"),
        ([_record("4", "Q?\nContext: N/A\nOptions: x, y", "A")], None, "record '4'"),
        ([_record("5", "Q?\nA. x\nB. y\n<image>", "A")], None, "record '5': the <image> marker"),
        ([_record("6", "Q?\nContext: N/A\nOptions: (A) x (B) y", "I think so")], None, "record '6': .*None"),
        (
            [
                _record("7", "Q?\nContext: N/A\nOptions: (A) x (B) y", "A"),
                _record("8", "Q?\nContext: h\nA. x\nB. y", "A"),
            ],
            None,
            "record '8'",
        ),
    ],
)
def test_a_file_that_does_not_parse_names_the_file_and_record(tmp_path, records, style, message):
    path = _write(tmp_path, records)
    with pytest.raises(DataError, match=f"llava.json: {message}"):
        LLaVAScienceQA(path, tmp_path, "generate", style=style)


@pytest.mark.parametrize("answer_position", ["first", "last"])
def test_the_random_fallback_stays_among_the_problems_options(tmp_path, answer_position):
    """A model whose every answer is unparseable scores the options' chance level under LaVIN's random policy.
    The old parser counted ``(`` after ``Options:`` (none in LLaVA's evaluation file) and floored the count at
    the answer's letter, so with the answer first it drew A every time."""
    sizes = [random.Random(i).randint(2, 5) for i in range(600)]
    records = []
    for i, n in enumerate(sizes):
        answer = "ABCDE"[0 if answer_position == "first" else n - 1]
        options = [f"{'ABCDE'[k]}. option {k}" for k in range(n)]
        records.append(_record(str(i), "\n".join([f"Context: hint {i}", f"Question {i}?", *options]), answer))
    dataset = LLaVAScienceQA(_write(tmp_path, records), tmp_path, "generate")
    fallback = random.Random(1)
    correct = []
    for sample in dataset:
        parsed = parse_answer("I am not sure.", sample["choices"])
        correct.append(resolve_unparseable(parsed, len(sample["choices"]), "random", fallback) == sample["target"])
    chance = mean(1 / n for n in sizes)
    noise = 4 * (chance * (1 - chance) / len(sizes)) ** 0.5
    assert abs(mean(correct) - chance) < noise


def test_settings_refused_before_reading(tmp_path):
    with pytest.raises(ConfigError, match="llava_style 'QMC'"):
        ScienceQADataModule(root=str(tmp_path), layout="llava", llava_style="QMC")
    with pytest.raises(ConfigError, match="cloze needs the official layout"):
        ScienceQADataModule(root=str(tmp_path), layout="llava", prompt_format="cloze", evaluation="score")


def test_llava_file_names_any_file_per_split(tmp_path):
    root = tmp_path / "data"
    _write(root, [record for record, *_ in CQM_EVALUATION], "llava_test_CQM-A.json", root / "images" / "test")
    data = ScienceQADataModule(root=str(root), layout="llava", llava_file="llava_{split}_CQM-A.json")
    assert len(data.dataset("test", "score")) == 4
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text((root / "llava_test_CQM-A.json").read_text())
    absolute = ScienceQADataModule(root=str(root), layout="llava", llava_file=str(elsewhere))
    assert absolute.dataset("test", "generate").style == "CQM"
    with pytest.raises(DataError, match="llava_val_QCM-LEA.json does not exist"):
        ScienceQADataModule(root=str(root), layout="llava").dataset("val", "generate")


def test_scored_llava_test_reports_the_official_columns_it_can(tmp_path):
    from conftest import tiny_config, tiny_trainer

    from mma.module import MMAModule

    root = tmp_path / "data"
    _write(root, [record for record, *_ in CQM_EVALUATION], "llava_test_CQM-A.json", root / "images" / "test")
    data = ScienceQADataModule(
        root=str(root),
        layout="llava",
        llava_file="llava_{split}_CQM-A.json",
        evaluation="score",
        answer_style="text",
        eval_batch_size=2,
    )
    module = MMAModule(tiny_config(), max_length=384)
    results = tiny_trainer(default_root_dir=tmp_path).test(module, datamodule=data, verbose=False)[0]
    assert {"test/Avg@sum", "test/Avg@mean", "test/Avg@char", "test/TXT", "test/IMG", "test/NO"} <= set(results)
    assert results["test/Avg"] == results["test/Avg@mean"]
    table = (tmp_path / "results_test.md").read_text()
    cells = table.splitlines()[4].strip("| ").split(" | ")
    header = table.splitlines()[2].strip("| ").split(" | ")
    assert {column for column, cell in zip(header, cells, strict=True) if cell == "n/a"} == set(LLAVA_UNAVAILABLE)
    assert "normalisation mean" in table and "n/a: LLaVA's files carry no subject or grade" in table
    assert json.loads((tmp_path / "predictions_test.json").read_text())["score_normalisation"] == "mean"


def _to_llava(pid: str, p: dict, fmt: str) -> dict:
    """One problem as LLaVA writes it: its converter's ``fmt`` (e.g. QCM-LEA), or ``CQM-A-lines``, its
    evaluation file's layout (``A. x`` lines, a Context line only with a hint, ``<image>`` first)."""
    letters, answer = "ABCDE", "ABCDE"[p["answer"]]
    if fmt == "CQM-A-lines":
        head = (["<image>"] if p["image"] else []) + ([f"Context: {p['hint']}"] if p["hint"] else [])
        options = [f"{letters[i]}. {choice}" for i, choice in enumerate(p["choices"])]
        return _record(pid, "\n".join([*head, p["question"], *options]), answer, bool(p["image"]))
    inputs, outputs = fmt.split("-")
    fields = {
        "Q": f"Question: {p['question']}",
        "C": f"Context: {p['hint'] or 'N/A'}",
        "M": "Options: " + " ".join(f"({letters[i]}) {choice}" for i, choice in enumerate(p["choices"])),
    }
    because = {"L": p["lecture"], "E": p["solution"]}
    parts = re.findall(r"[QCM]|[LE]+", inputs)
    human = "\n".join(fields.get(part) or "BECAUSE: " + " ".join(because[x] for x in part) for part in parts)
    human = human.replace("  ", " ").strip().removeprefix("Question: ").removesuffix("BECAUSE:").strip()
    gpt = {
        "A": f"The answer is {answer}.",
        "LEA": f"{p['lecture']} {p['solution']} The answer is {answer}.",
        "ALE": f"The answer is {answer}. BECAUSE: {p['lecture']} {p['solution']}",
        "LEPA": f"LECTURE: {p['lecture']}\nSOLUTION: {p['solution']}\n###\nANSWER: {answer}.",
    }[outputs]
    return _record(pid, human + ("\n<image>" if p["image"] else ""), gpt, bool(p["image"]))


@needs_sample
@pytest.mark.parametrize(
    "fmt", ["CQM-A-lines", "QCM-A", "QCM-LEA", "QCM-ALE", "QCM-LEPA", *(f"{i}-A" for i in INPUT_FORMATS if i != "QCM")]
)
def test_llava_files_built_from_the_sample_parse_to_the_official_options(tmp_path, fmt):
    problems, _ = load_problems(SAMPLE)
    path = _write(tmp_path, [_to_llava(pid, p, fmt) for pid, p in problems.items()])
    dataset = LLaVAScienceQA(path, tmp_path / "no-images", "generate", missing_images="text_only")
    same_order = re.sub("[LE]+", "L", fmt.split("-")[0])
    assert re.sub("[LE]+", "L", dataset.style) == same_order
    for record, (turn, target) in zip(dataset.records, dataset.parsed, strict=True):
        p = problems[record["id"]]
        assert len(turn.options) == len(p["choices"]) and target == p["answer"], record["id"]
        assert turn.options == [choice.replace("  ", " ") for choice in p["choices"]]
        official = [g for g in official_groups(p) if g not in LLAVA_UNAVAILABLE]
        assert llava_groups(turn) == official, record["id"]
