"""ScienceQA (Lu et al., NeurIPS 2022) in its official layout, and LLaVA's conversation JSON of it.

Official layout: ``problems.json`` (pid -> problem), ``pid_splits.json`` (split -> pids),
``images/<split>/<pid>/image.png``. Problems are validated when loaded and every image path is checked before
training starts, so a bad file is reported with its problem id, not as a crash hours in.
"""

import json
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader, Dataset

from mma.data.base import Evaluation, MMADataModule
from mma.data.images import load_image
from mma.data.prompts import LETTERS, AnswerStyle, check_format, format_options, scienceqa_input, scienceqa_output
from mma.errors import DataError

MissingImages = Literal["error", "skip", "text_only"]
EvaluationMode = Literal["generate", "score"]
# The official table's columns, in its order.
OFFICIAL_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


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
        missing = {pid: path for pid, path in self.images.items() if not path.is_file()}
        if missing and missing_images == "error":
            pid, path = next(iter(missing.items()))
            raise DataError(
                f"problem {pid}: image {path} is missing ({len(missing)} of {len(self.images)} images "
                f"of split {split!r}); set missing_images to skip or text_only to go on without them"
            )
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
        context = " ".join([p.get("hint") or "", p.get("caption", "") if self.use_caption else ""]).strip() or "N/A"
        lecture = (p.get("lecture") or "").replace("\n", "\\n")
        solution = (p.get("solution") or "").replace("\n", "\\n")
        prompt = scienceqa_input(
            self.prompt_format, p["question"], context, format_options(p["choices"]), lecture, solution
        )
        image = load_image(self.images[pid]) if pid in self.images else None
        sample = {"prompt": prompt, "image": image, "pid": pid}
        answers = [LETTERS[i] if self.answer_style == "letter" else c for i, c in enumerate(p["choices"])]
        if self.mode == "train":
            return {**sample, "answer": scienceqa_output(self.prompt_format, answers[p["answer"]], lecture, solution)}
        evaluation = {"target": p["answer"], "groups": official_groups(p), "choices": p["choices"]}
        if self.mode == "score":
            return {**sample, **evaluation, "candidates": [f"The answer is {a}." for a in answers]}
        return {**sample, **evaluation, "answer": None}


class LLaVAScienceQA(Dataset):
    """LLaVA's ScienceQA conversations (``llava_<split>_QCM-LEA.json``): the human turn is the prompt (its
    ``<image>`` marker removed), the assistant turn the target; the image lies under ``image_root``."""

    def __init__(self, path: Path, image_root: Path, mode: Literal["train", "generate"]) -> None:
        self.records = _read_json(path, list, "conversation records")
        self.image_root, self.mode, self.path = image_root, mode, path
        if not self.records:
            raise DataError(f"{path}: no records")
        for number, record in enumerate(self.records):
            record = record if isinstance(record, dict) else {"id": f"number {number}"}
            turns = record.get("conversations", [])
            if len(turns) < 2 or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
                raise DataError(f"{path}: record {record.get('id')!r} has no human/assistant exchange")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        human, assistant = record["conversations"][0]["value"], record["conversations"][1]["value"]
        prompt = human.replace("<image>", "").strip()
        image = load_image(self.image_root / record["image"]) if record.get("image") else None
        sample = {"prompt": prompt, "image": image, "pid": str(record["id"])}
        if self.mode == "train":
            return {**sample, "answer": assistant}
        letter = assistant.rsplit("The answer is ", 1)[-1][:1]
        if letter not in LETTERS:
            raise DataError(f"{self.path}: record {record['id']!r}: no 'The answer is X' in the assistant turn")
        options = prompt.split("Options:", 1)[-1].count("(")
        return {
            **sample,
            "answer": None,
            "target": LETTERS.index(letter),
            "groups": ["Avg"],
            "choices": [LETTERS[i] for i in range(max(options, LETTERS.index(letter) + 1))],
        }


class ScienceQADataModule(MMADataModule):
    """ScienceQA for fine-tuning and evaluation.

    Args:
        root: the data folder (official layout: problems.json, pid_splits.json, images/).
        layout: ``official``, or ``llava`` for ``root/llava_<split>_QCM-LEA.json`` conversation files.
        train_split: split used for training (any name in pid_splits.json).
        val_split: split used for validation.
        test_split: split used by ``mma test``.
        prompt_format: the field's format name, e.g. QCM-ALE (LaVIN), QCM-A, CQM-A, QCM-LEA.
        answer_style: ``letter`` (``The answer is B.``) or ``text`` (the option's text, for small models).
        use_caption: add the ``caption`` of each problem (from ``captions``) to the context.
        captions: a captions.json file ({"captions": {pid: text}}).
        missing_images: ``error`` stops naming the problem and path; ``skip`` drops such problems;
            ``text_only`` keeps them without their image.
        evaluation: ``generate`` and parse ``The answer is X``, or ``score`` each option's log-likelihood.
        unparseable: a generated answer that names no option counts as ``wrong``, or (LaVIN) as a ``random``
            option; their count is always reported.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the random fallback.
    """

    def __init__(
        self,
        root: str = "data/scienceqa",
        layout: Literal["official", "llava"] = "official",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        prompt_format: str = "QCM-ALE",
        answer_style: AnswerStyle = "letter",
        use_caption: bool = False,
        captions: str | None = None,
        missing_images: MissingImages = "error",
        evaluation: EvaluationMode = "generate",
        unparseable: Literal["wrong", "random"] = "wrong",
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()
        check_format(prompt_format)
        self.root = Path(root)
        self._problems: tuple[dict, dict] | None = None

    def evaluation(self) -> Evaluation:
        """The official table's columns, written as ScienceQA reports (``mma.evaluate``)."""
        h = self.hparams
        return Evaluation(
            groups=OFFICIAL_COLUMNS,
            headline="Avg",
            test_names=(h.test_split,),
            unparseable=h.unparseable,
            seed=h.seed,
            report="scienceqa",
            metadata={
                "prompt_format": h.prompt_format,
                "evaluation": h.evaluation,
                "unparseable_policy": h.unparseable,
            },
        )

    def problems(self) -> tuple[dict, dict]:
        """``problems.json`` and ``pid_splits.json`` of the official layout, read once and checked."""
        if self._problems is None:
            self._problems = load_problems(self.root, self.hparams.captions)
        return self._problems

    def dataset(self, split: str, mode: Literal["train", "generate", "score"]) -> Dataset:
        h = self.hparams
        if h.layout == "llava":
            path = self.root / f"llava_{split}_QCM-LEA.json"
            return LLaVAScienceQA(path, self.root / "images" / split, "train" if mode == "train" else "generate")
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
