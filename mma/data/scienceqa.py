"""ScienceQA (Lu et al., NeurIPS 2022) in its official layout, and LLaVA's conversation JSON of it.

Official layout: ``problems.json`` (pid -> problem), ``pid_splits.json`` (split -> pids),
``images/<split>/<pid>/image.png``. Problems are validated when loaded and every image path is checked before
training starts, so a bad file is reported with its problem id, not as a crash hours in. LLaVA's files are parsed
in full when read, for the same reason: each turn's options, answer and categories are known before any step.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader, Dataset

from mma.data.base import Evaluation, MMADataModule, row_chars
from mma.data.images import load_image
from mma.data.prompts import (
    CLOZE,
    INPUT_FORMATS,
    LETTERS,
    AnswerStyle,
    check_format,
    cloze_prompt,
    format_options,
    scienceqa_input,
    scienceqa_output,
)
from mma.errors import ConfigError, DataError

MissingImages = Literal["error", "skip", "text_only"]
EvaluationMode = Literal["generate", "score"]
# The official table's columns, in its order.
OFFICIAL_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
# Columns a LLaVA file cannot fill: its records carry no subject or grade.
LLAVA_UNAVAILABLE = ("NAT", "SOC", "LAN", "G1-6", "G7-12")


def official_groups(problem: dict) -> list[str]:
    """The official evaluation's categories of one problem (rules quoted in tests/test_scienceqa.py)."""
    groups = [_SUBJECTS[problem["subject"]]] if problem.get("subject") in _SUBJECTS else []
    if problem.get("hint"):
        groups.append("TXT")
    if problem.get("image"):
        groups.append("IMG")
    if not problem.get("hint") and not problem.get("image"):
        groups.append("NO")
    grade = str(problem.get("grade", "")).removeprefix("grade")
    if grade.isdigit():
        groups.append("G1-6" if int(grade) <= 6 else "G7-12")
    return [*groups, "Avg"]


def _read_json(path: Path, shape: type[dict] | type[list], what: str) -> dict | list:
    """The JSON file at ``path``, which must be a mapping or a list (``what`` says of what, for the error)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, shape):
        expected = "an object" if shape is dict else "a list"
        raise DataError(f"{path}: expected {expected} ({what}), found {type(data).__name__}")
    return data


def check_problem(pid: str, problem: dict) -> None:
    """Refuse a problem that cannot be asked: not a mapping, no question, choices that are not a list of texts,
    more than 26 of them, or an answer that is not an index into them."""
    if not isinstance(problem, dict):
        raise DataError(f"problem {pid}: expected an object, found {type(problem).__name__}")
    if not isinstance(problem.get("question"), str):
        raise DataError(f"problem {pid}: question must be a text, found {problem.get('question')!r}")
    choices = problem.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"problem {pid}: choices must be a list of texts, found {choices!r}")
    if not choices:
        raise DataError(f"problem {pid}: has no choices")
    if len(choices) > len(LETTERS):
        raise DataError(f"problem {pid}: {len(choices)} choices, at most {len(LETTERS)} can be lettered")
    answer = problem.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise DataError(f"problem {pid}: answer must be the index of a choice, found {answer!r}")
    if not 0 <= answer < len(choices):
        raise DataError(f"problem {pid}: answer index {answer!r} out of range for {len(choices)} choices")


def load_problems(root: Path, captions: str | None = None) -> tuple[dict, dict]:
    """``problems.json`` and ``pid_splits.json`` of ``root``, every problem checked; captions merged if given."""
    problems = _read_json(root / "problems.json", dict, "problem id -> problem")
    splits = _read_json(root / "pid_splits.json", dict, "split name -> problem ids")
    for pid, problem in problems.items():
        try:
            check_problem(pid, problem)
        except DataError as err:
            raise DataError(f"{root / 'problems.json'}: {err}") from None
    if captions is not None:
        for pid, caption in _read_json(Path(captions), dict, '{"captions": {pid: text}}').get("captions", {}).items():
            if pid in problems:
                problems[pid]["caption"] = caption
    return problems, splits


def answer_candidates(choices: list[str], style: AnswerStyle) -> list[str]:
    """``The answer is X.`` for every option, X its letter or its text."""
    return [f"The answer is {LETTERS[i] if style == 'letter' else c}." for i, c in enumerate(choices)]


def find_missing_images(images: dict[str, Path], policy: MissingImages, where: str) -> set[str]:
    """Ids whose image file is absent; under the ``error`` policy the first one stops the run, named."""
    missing = {pid: path for pid, path in images.items() if not path.is_file()}
    if missing and policy == "error":
        pid, path = next(iter(missing.items()))
        raise DataError(
            f"problem {pid}: image {path} is missing ({len(missing)} of {len(images)} images "
            f"of {where}); set missing_images to skip or text_only to go on without them"
        )
    return set(missing)


def split_ids(problems: dict, splits: dict, split: str, root: Path) -> list[str]:
    path = root / "pid_splits.json"
    if split not in splits:
        raise DataError(f"{path}: unknown split {split!r}; splits: {sorted(splits)}")
    if not isinstance(splits[split], list):
        raise DataError(f"{path}: split {split!r} must be a list of problem ids, found {type(splits[split]).__name__}")
    if not splits[split]:
        raise DataError(f"{path}: split {split!r} is empty")
    unknown = [pid for pid in splits[split] if pid not in problems]
    if unknown:
        raise DataError(f"{root}: split {split!r} lists problems missing from problems.json: {unknown[:5]}")
    return list(splits[split])


class ScienceQA(Dataset):
    """One split as training samples (prompt + target) or evaluation samples (prompt + options to choose)."""

    def __init__(
        self,
        root: Path,
        problems: dict,
        pids: list[str],
        split: str,
        prompt_format: str,
        answer_style: AnswerStyle,
        use_caption: bool,
        missing_images: MissingImages,
        mode: Literal["train", "generate", "score"],
    ) -> None:
        check_format(prompt_format)
        self.problems, self.split, self.mode = problems, split, mode
        self.prompt_format, self.answer_style, self.use_caption = prompt_format, answer_style, use_caption
        self.images = {pid: self._image_path(root, pid) for pid in pids if problems[pid].get("image")}
        missing = find_missing_images(self.images, missing_images, f"split {split!r}")
        self.pids = [pid for pid in pids if not (pid in missing and missing_images == "skip")]
        if not self.pids:
            raise DataError(f"split {split!r}: every problem lacks its image and missing_images is skip")
        for pid in missing:
            self.images.pop(pid)

    def _image_path(self, root: Path, pid: str) -> Path:
        problem = self.problems[pid]
        return root / "images" / problem.get("split", self.split) / pid / problem["image"]

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> dict:
        pid = self.pids[index]
        p = self.problems[pid]
        prompt, answer, candidates = self._texts(p)
        image = load_image(self.images[pid]) if pid in self.images else None
        sample = {"prompt": prompt, "image": image, "pid": pid}
        if self.mode == "train":
            return {**sample, "answer": answer}
        evaluation = {"target": p["answer"], "groups": official_groups(p), "choices": p["choices"]}
        if self.mode == "score":
            return {**sample, **evaluation, "candidates": candidates}
        return {**sample, **evaluation, "answer": None}

    def _texts(self, p: dict) -> tuple[str, str, list[str]]:
        """Prompt, training target and the candidates to score, in ``prompt_format`` (cloze: the option texts)."""
        context = " ".join([p.get("hint") or "", p.get("caption", "") if self.use_caption else ""]).strip()
        if self.prompt_format == CLOZE:
            return cloze_prompt(p["question"], context), p["choices"][p["answer"]], list(p["choices"])
        lecture = (p.get("lecture") or "").replace("\n", "\\n")
        solution = (p.get("solution") or "").replace("\n", "\\n")
        options = format_options(p["choices"])
        prompt = scienceqa_input(self.prompt_format, p["question"], context or "N/A", options, lecture, solution)
        answer = LETTERS[p["answer"]] if self.answer_style == "letter" else p["choices"][p["answer"]]
        target = scienceqa_output(self.prompt_format, answer, lecture, solution)
        return prompt, target, answer_candidates(p["choices"], self.answer_style)

    def text_lengths(self) -> list[int]:
        """Characters of every problem's row (``TextLengths``): prompt and training target, prompt and every
        candidate when scoring, the prompt alone when generating; no picture is read."""
        texts = (self._texts(self.problems[pid]) for pid in self.pids)
        return [self._row_chars(prompt, target, candidates) for prompt, target, candidates in texts]

    def _row_chars(self, prompt: str, target: str, candidates: list[str]) -> int:
        if self.mode == "score":
            return row_chars(prompt, candidates=candidates)
        return row_chars(prompt, target if self.mode == "train" else None)


# LLaVA's converter (haotian-liu/LLaVA scripts/convert_sqa_to_llava.py) writes a problem's input fields as
# labelled lines in its format's order, e.g. QCM: the question (its ``Question: `` label dropped), ``Context: ``
# (``N/A`` without a hint), ``Options: (A) x (B) y``; L/E letters add a ``BECAUSE: `` line, dropped when empty.
# ``\n<image>`` ends an image problem's turn. LLaVA's evaluation file (``llava_test_CQM-A.json``) differs: it
# starts with ``<image>\n``, has a ``Context:`` line only when there is a hint, then the question and one ``A. x``
# line per option. Hints, questions and lectures may span several lines.
LLAVA_STYLES = INPUT_FORMATS
_LABELS = {"Question:": "Q", "Context:": "C", "Options:": "M", "BECAUSE:": "B"}
# The answer of a gpt turn: ``The answer is X.`` (outputs A, LEA, ALE, ...), ``ANSWER: X.`` (LEPA), or a
# leading ``X`` / ``X. text`` (evaluation files).
_GPT_ANSWERS = tuple(map(re.compile, (r"The answer is ([A-Z])\.", r"\bANSWER: ([A-Z])\.", r"^([A-Z])(?:\.|$)")))


@dataclass(frozen=True)
class LLaVATurn:
    """What a human turn says: its options' texts, whether it shows an image, whether it has a hint."""

    options: list[str]
    has_image: bool
    has_context: bool


def _sections(lines: list[str]) -> list[tuple[str, str]]:
    """(field letter, text) of each field: a labelled line opens a field, other lines continue it, and an
    unlabelled start is the question. ``B`` is a BECAUSE line."""
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        label = next((label for label in _LABELS if line.startswith(label)), None)
        if label is not None:
            sections.append((_LABELS[label], [line.removeprefix(label).strip()]))
        elif sections:
            sections[-1][1].append(line)
        else:
            sections.append(("Q", [line]))
    return [(field, "\n".join(text)) for field, text in sections]


def _option_lines(lines: list[str]) -> int:
    """Where the closing ``A. x``, ``B. y``, ... lines start; ``len(lines)`` when the turn does not end in them."""
    start = max((i for i, line in enumerate(lines) if line.startswith("A. ")), default=len(lines))
    tail = lines[start:]
    in_order = len(tail) <= len(LETTERS) and all(line.startswith(f"{LETTERS[i]}. ") for i, line in enumerate(tail))
    return start if in_order else len(lines)


def _marker_options(text: str) -> list[str] | None:
    """``(A) x (B) y`` -> ``["x", "y"]``. Each marker is searched in letter order after the previous one, so an
    option's own parentheses stay text. None without ``(A)``."""
    if not text.startswith("(A) "):
        return None
    options, rest = [], text.removeprefix("(A) ")
    for letter in LETTERS[1:]:
        option, marker, rest = rest.partition(f" ({letter}) ")
        options.append(option)
        if not marker:
            return options
    return [*options, rest]


def _style_fields(style: str) -> list[str]:
    """``QCLEM`` -> ``["Q", "C", "B", "M"]``: a run of L/E letters is one BECAUSE line."""
    return ["B" if part[0] in "LE" else part for part in re.findall(r"[QCM]|[LE]+", style)]


def parse_llava_turn(text: str, style: str) -> LLaVATurn:
    """The options, image marker and hint of a human turn in ``style`` (the input part of LLaVA's format name:
    QCM, CQM, QCML, ...). Raises ValueError saying what does not fit."""
    lines = text.replace("<image>", "").strip().split("\n")
    start = _option_lines(lines)
    if start < len(lines):  # LLaVA's evaluation file
        fields = [field for field, _ in _sections(lines[:start])]
        if style != "CQM" or fields not in (["C"], ["Q"]):
            raise ValueError(f"'A. ' option lines after fields {''.join(fields)}; LLaVA writes them only in CQM")
        return LLaVATurn([line[3:] for line in lines[start:]], "<image>" in text, fields == ["C"])
    sections = _sections(lines)
    fields, expected = [field for field, _ in sections], _style_fields(style)
    if fields not in (expected, [field for field in expected if field != "B"]):
        raise ValueError(f"fields {''.join(fields)} (B: BECAUSE) are not in {style}'s order {''.join(expected)}")
    values = dict(sections)
    options = _marker_options(values["M"])
    if options is None:
        raise ValueError("the Options line does not start with '(A) '")
    return LLaVATurn(options, "<image>" in text, values["C"] not in ("", "N/A"))


def llava_answer(text: str) -> str | None:
    """The option letter a gpt turn answers; None when it names none, or two different ones."""
    for pattern in _GPT_ANSWERS:
        letters = set(pattern.findall(text))
        if letters:
            return letters.pop() if len(letters) == 1 else None
    return None


def llava_groups(turn: LLaVATurn) -> list[str]:
    """The official TXT / IMG / NO categories, which a LLaVA turn still shows (hint line, image marker)."""
    groups = (["TXT"] if turn.has_context else []) + (["IMG"] if turn.has_image else [])
    return [*(groups or ["NO"]), "Avg"]


def _exchange(record: dict, path: Path) -> tuple[str, str]:
    turns = record.get("conversations", [])
    if len(turns) < 2 or turns[0].get("from") != "human":
        raise DataError(f"{path}: record {record.get('id')!r} has no human/assistant exchange")
    return turns[0]["value"], turns[1]["value"]


def _misfit(text: str, style: str) -> str | None:
    """Why ``text`` is not a human turn in ``style``; None when it is one."""
    try:
        parse_llava_turn(text, style)
    except ValueError as err:
        return str(err)
    return None


def llava_style(records: list[dict], path: Path, style: str | None = None) -> str:
    """The style all human turns of a file are in: ``style`` checked, or the first one they all fit."""
    styles = [style] if style else list(LLAVA_STYLES)
    for record in records:
        human, _ = _exchange(record, path)
        fitting = [s for s in styles if _misfit(human, s) is None]
        if not fitting:
            raise DataError(
                f"{path}: record {record.get('id')!r}: not in LLaVA's {'/'.join(styles)} prompt style "
                f"({styles[0]}: {_misfit(human, styles[0])})"
            )
        styles = fitting
    return styles[0]


def parse_llava_record(record: dict, style: str, path: Path) -> tuple[LLaVATurn, int]:
    """A record's human turn, parsed, and the index of its gpt turn's answer among the turn's options."""
    human, gpt = _exchange(record, path)
    where = f"{path}: record {record.get('id')!r}"
    try:
        turn = parse_llava_turn(human, style)
    except ValueError as err:
        raise DataError(f"{where}: not in LLaVA's {style} prompt style ({err})") from None
    letter = llava_answer(gpt)
    if letter is None or LETTERS.index(letter) >= len(turn.options):
        raise DataError(f"{where}: the gpt turn answers {letter!r}, not one of the {len(turn.options)} options")
    if turn.has_image != bool(record.get("image")):
        raise DataError(f"{where}: the <image> marker and the 'image' key disagree")
    return turn, LETTERS.index(letter)


class LLaVAScienceQA(Dataset):
    """LLaVA's ScienceQA conversations (``llava_<split>_<format>.json``): the human turn is the prompt (its
    ``<image>`` marker removed), the gpt turn the training target. Every turn is parsed when the file is read
    (``style`` given or found), so evaluation has each problem's options; images lie under ``image_root``."""

    def __init__(
        self,
        path: Path,
        image_root: Path,
        mode: Literal["train", "generate", "score"],
        answer_style: AnswerStyle = "letter",
        style: str | None = None,
        missing_images: MissingImages = "error",
    ) -> None:
        records = _read_json(path, list, "LLaVA conversation records")
        if not records:
            raise DataError(f"{path}: no records")
        self.style = llava_style(records, path, style)
        parsed = [parse_llava_record(record, self.style, path) for record in records]
        images = {str(r["id"]): image_root / r["image"] for r in records if r.get("image")}
        missing = find_missing_images(images, missing_images, str(path))
        keep = [i for i, r in enumerate(records) if not (str(r["id"]) in missing and missing_images == "skip")]
        self.records, self.parsed = [records[i] for i in keep], [parsed[i] for i in keep]
        self.images = {pid: image for pid, image in images.items() if pid not in missing}
        self.mode, self.answer_style = mode, answer_style

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record, (turn, target) = self.records[index], self.parsed[index]
        human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
        pid = str(record["id"])
        image = load_image(self.images[pid]) if pid in self.images else None
        sample = {"prompt": human.replace("<image>", "").strip(), "image": image, "pid": pid}
        if self.mode == "train":
            return {**sample, "answer": gpt}
        evaluation = {"target": target, "groups": llava_groups(turn), "choices": turn.options}
        if self.mode == "score":
            return {**sample, **evaluation, "candidates": answer_candidates(turn.options, self.answer_style)}
        return {**sample, **evaluation, "answer": None}

    def text_lengths(self) -> list[int]:
        """Characters of every record's row (``TextLengths``): human and gpt turns, the human turn and every
        candidate when scoring, the human turn alone when generating; no picture is read."""
        lengths = []
        for record, (turn, _) in zip(self.records, self.parsed, strict=True):
            human, gpt = (t["value"] for t in record["conversations"][:2])
            if self.mode == "score":
                lengths.append(row_chars(human, candidates=answer_candidates(turn.options, self.answer_style)))
            else:
                lengths.append(row_chars(human, gpt if self.mode == "train" else None))
        return lengths


def check_settings(layout: str, prompt_format: str, evaluation: str, llava_style: str | None) -> None:
    """Refuse setting combinations that would evaluate something else than asked, before any data is read."""
    check_format(prompt_format)
    if prompt_format == CLOZE and evaluation != "score":
        raise ConfigError("prompt_format cloze lists no options to name in a generated answer: use evaluation: score")
    if prompt_format == CLOZE and layout == "llava":
        raise ConfigError("prompt_format cloze needs the official layout: LLaVA's files bring their own prompts")
    if llava_style is not None and llava_style not in LLAVA_STYLES:
        raise ConfigError(f"llava_style {llava_style!r} is none of LLaVA's styles {LLAVA_STYLES}")


class ScienceQADataModule(MMADataModule):
    """ScienceQA for fine-tuning and evaluation.

    Args:
        root: the data folder (official layout: problems.json, pid_splits.json, images/).
        layout: ``official``, or ``llava`` for LLaVA's conversation files (``llava_file``).
        llava_file: the LLaVA file of each split, relative to ``root`` or absolute; ``{split}`` becomes the
            split's name, e.g. ``llava_{split}_CQM-A.json``.
        llava_style: the prompt style of the LLaVA file's human turns, the input part of LLaVA's format name
            (``QCM``, ``CQM``, ``QCML``, ...); None finds it from the turns. Every turn is checked against it.
        train_split: split used for training (any name in pid_splits.json).
        val_split: split used for validation.
        test_split: split used by ``mma test``.
        prompt_format: the field's format name, e.g. QCM-ALE (LaVIN), QCM-A, CQM-A, QCM-LEA; or ``cloze``
            (``Question: ...\nAnswer:`` without the options, whose texts are scored: needs ``evaluation: score``).
            Official layout only: a LLaVA file brings its own prompts.
        answer_style: ``letter`` (``The answer is B.``) or ``text`` (the option's text, for small models).
        use_caption: add the ``caption`` of each problem (from ``captions``) to the context.
        captions: a captions.json file ({"captions": {pid: text}}).
        missing_images: ``error`` stops naming the problem and path; ``skip`` drops such problems;
            ``text_only`` keeps them without their image.
        evaluation: ``generate`` and parse ``The answer is X``, or ``score`` each option's log-likelihood.
        score_normalisation: how scored options compare: ``mean`` log-probability per token, per ``char`` of
            the scored text (lm-evaluation-harness's acc_norm), or the ``sum`` (favours short options). ``mma
            test`` also reports the overall accuracy under each (``test/Avg@sum``, ...).
        unparseable: a generated answer that names no option counts as ``wrong``, or (LaVIN) as a ``random``
            option; their count is always reported.
        answer_prefix: text that generation starts after, given at the end of every prompt and read in front of
            the generated text: MemVP's evaluation gives ``The answer is`` and decodes one token
            (``model.max_new_tokens: 1``); empty, the model writes the whole answer (LaVIN).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the random fallback.
        group_by_length: batch training problems of similar prompt + answer length together and evaluate the
            longest first (less padding; a sample's loss and score are unchanged, only its batch mates are).
    """

    def __init__(
        self,
        root: str = "data/scienceqa",
        layout: Literal["official", "llava"] = "official",
        llava_file: str = "llava_{split}_QCM-LEA.json",
        llava_style: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        prompt_format: str = "QCM-ALE",
        answer_style: AnswerStyle = "letter",
        use_caption: bool = False,
        captions: str | None = None,
        missing_images: MissingImages = "error",
        evaluation: EvaluationMode = "generate",
        score_normalisation: Literal["sum", "mean", "char"] = "mean",
        unparseable: Literal["wrong", "random"] = "wrong",
        answer_prefix: str = "",
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, group_by_length)
        self.save_hyperparameters()
        check_settings(layout, prompt_format, evaluation, llava_style)
        if answer_prefix and evaluation != "generate":
            raise ConfigError("answer_prefix starts generated answers: it needs evaluation: generate")
        self.root = Path(root)
        self._problems: tuple[dict, dict] | None = None

    def evaluation(self) -> Evaluation:
        """The official table's columns (those a LLaVA file cannot fill marked), written as ScienceQA reports
        (``mma.evaluate``)."""
        h = self.hparams
        metadata = {"prompt_format": h.prompt_format, "evaluation": h.evaluation, "unparseable_policy": h.unparseable}
        if h.evaluation == "score":
            metadata["score_normalisation"] = h.score_normalisation
        if h.answer_prefix:
            metadata["answer_prefix"] = h.answer_prefix
        return Evaluation(
            groups=OFFICIAL_COLUMNS,
            headline="Avg",
            test_names=(h.test_split,),
            unparseable=h.unparseable,
            seed=h.seed,
            score_normalisation=h.score_normalisation,
            answer_prefix=h.answer_prefix,
            unavailable=LLAVA_UNAVAILABLE if h.layout == "llava" else (),
            report="scienceqa",
            metadata=metadata,
        )

    def problems(self) -> tuple[dict, dict]:
        """``problems.json`` and ``pid_splits.json`` of the official layout, read once and checked."""
        if self._problems is None:
            self._problems = load_problems(self.root, self.hparams.captions)
        return self._problems

    def dataset(self, split: str, mode: Literal["train", "generate", "score"]) -> Dataset:
        h = self.hparams
        if h.layout == "llava":
            path = self.root / h.llava_file.format(split=split)
            image_root = self.root / "images" / split
            return LLaVAScienceQA(path, image_root, mode, h.answer_style, h.llava_style, h.missing_images)
        problems, splits = self.problems()
        pids = split_ids(problems, splits, split, self.root)
        return ScienceQA(
            self.root, problems, pids, split, h.prompt_format, h.answer_style, h.use_caption, h.missing_images, mode
        )

    def setup(self, stage: str) -> None:
        """Build (and so check) every split the stage needs before any step runs."""
        h = self.hparams
        if stage == "fit":
            self.train_set = self.dataset(h.train_split, "train")
        if stage in ("fit", "validate"):
            self.val_set = self.dataset(h.val_split, h.evaluation)
        if stage == "test":
            self.test_set = self.dataset(h.test_split, h.evaluation)
        if stage == "predict":
            self.predict_set = self.dataset(h.test_split, "generate")

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader(self.predict_set)
