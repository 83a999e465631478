"""Reading answers out of generated text, and the reports evaluation writes (per data set, by the name its
``Evaluation`` gives)."""

import json
import random
import re
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from rich.console import Console
from rich.markdown import Markdown

from mma.data.base import Evaluation
from mma.data.prompts import LETTERS
from mma.data.scienceqa import OFFICIAL_COLUMNS, ScienceQADataModule, official_groups, split_ids
from mma.errors import DataError
from mma.metrics import GroupedAccuracy

_ANSWER = re.compile(r"The answer is ([A-Z])\b")
_ANSWER_TEXT = re.compile(r"The answer is (.+?)\.(?:\s|$)")


def parse_answer(text: str, choices: list[str]) -> int | None:
    """Index of the option that ``The answer is X`` names (a letter, or an option's text); None if none."""
    match = _ANSWER.search(text)
    if match and LETTERS.index(match.group(1)) < len(choices):
        return LETTERS.index(match.group(1))
    match = _ANSWER_TEXT.search(text)
    if match and match.group(1).strip() in choices:
        return choices.index(match.group(1).strip())
    return None


def resolve_unparseable(parsed: int | None, num_choices: int, policy: str, rng: random.Random) -> int:
    """-1 (always wrong) for an unparseable answer, or LaVIN's random option when ``policy == "random"``."""
    if parsed is not None:
        return parsed
    return rng.randrange(num_choices) if policy == "random" else -1


def markdown_table(columns: tuple[str, ...], scores: dict[str, float], unavailable: Collection[str] = ()) -> str:
    """One-row Markdown table of accuracies in percent, in ``columns`` order: ``-`` for a group without samples,
    ``n/a`` for a column the data cannot fill (``unavailable``)."""
    cells = [
        "n/a" if c in unavailable else f"{100 * scores[c]:.2f}" if scores.get(c) == scores.get(c) else "-"
        for c in columns
    ]
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), "| " + " | ".join(cells) + " |"])


def score_note(normalisation: str, scores: dict[str, float], overall: str) -> str:
    """How scored options were compared, with the overall accuracy under each normalisation measured."""
    others = [f"{name.split('@')[1]} {100 * v:.2f}" for name, v in scores.items() if name.startswith(f"{overall}@")]
    measured = f" ({overall} under {', '.join(others)})" if others else ""
    return f"options scored by log-likelihood, normalisation {normalisation}{measured}"


def write_predictions(path: Path, split: str, records: list[dict], metadata: dict) -> None:
    """``{"split", ..., "predictions": {pid: {"answer": letter or null, "text": generated}}}``."""
    predictions = {
        r["pid"]: {"answer": LETTERS[r["predicted"]] if r["predicted"] >= 0 else None, "text": r["text"]}
        for r in records
    }
    path.write_text(json.dumps({"split": split, **metadata, "predictions": predictions}, indent=1))


def read_predictions(path: Path, split: str, pids: list[str]) -> dict[str, int]:
    """pid -> predicted option index (-1 when none) from a predictions file of exactly this split."""
    data = json.loads(Path(path).read_text())
    if data.get("split") != split:
        raise DataError(f"{path}: predictions are for split {data.get('split')!r}, not {split!r}")
    predictions = data["predictions"]
    if set(predictions) != set(pids):
        missing, extra = sorted(set(pids) - set(predictions)), sorted(set(predictions) - set(pids))
        raise DataError(f"{path}: predictions do not cover split {split!r}: missing {missing[:5]}, extra {extra[:5]}")
    return {pid: LETTERS.index(p["answer"]) if p["answer"] else -1 for pid, p in predictions.items()}


# report(name, records, scores, unparseable, evaluation, folder): files for one test loader's results.
Report = Callable[[str, list[dict], dict, int, Evaluation, Path], None]


def scienceqa_report(
    name: str, records: list[dict], scores: dict, unparseable: int, evaluation: Evaluation, folder: Path
) -> None:
    """Write ``predictions_<split>.json`` and ``results_<split>.md`` (official columns); print the table."""
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions(folder / f"predictions_{name}.json", name, records, evaluation.metadata)
    table = markdown_table(evaluation.groups, scores, evaluation.unavailable)
    if evaluation.metadata.get("evaluation") == "score":
        note = f"{len(records)} problems, {score_note(evaluation.score_normalisation, scores, evaluation.headline)}"
    else:
        note = f"{len(records)} problems, {unparseable} unparseable answers (counted {evaluation.unparseable})"
    if evaluation.unavailable:
        note += "; n/a: LLaVA's files carry no subject or grade"
    chance = [scores.get(f"chance/{group}", float("nan")) for group in evaluation.groups]
    table += "\n| " + " | ".join("-" if c != c else f"{100 * c:.2f}" for c in chance) + " |"
    note += "; second row: chance, the mean of 1 / options"
    (folder / f"results_{name}.md").write_text(f"# ScienceQA {name}\n\n{table}\n\n{note}\n")
    Console().print(Markdown(f"**ScienceQA {name}, accuracy (%)**: {note}\n\n{table}"))


REPORTS: dict[str, Report] = {"scienceqa": scienceqa_report}


def rescore_scienceqa(data: ScienceQADataModule, predictions: Path) -> dict[str, float]:
    """Official accuracies of a predictions file, which must be of the data's ``test_split`` and cover it exactly."""
    problems, splits = data.problems()
    split = data.hparams.test_split
    pids = split_ids(problems, splits, split, data.root)
    chosen = read_predictions(predictions, split, pids)
    metric = GroupedAccuracy(OFFICIAL_COLUMNS)
    metric.update(
        torch.tensor([chosen[p] == problems[p]["answer"] for p in pids]),
        [official_groups(problems[p]) for p in pids],
    )
    return {k: float(v) for k, v in metric.compute().items()}
