"""easy-VQA (Zhou, 2020, https://github.com/vzhou842/easy-VQA): real VQA data small enough for a CPU run.

Each 64x64 picture shows one shape (circle, rectangle or triangle) in one of 8 colours on a light background; each
question is templated and has one of 13 answers. The data ship inside the ``easy-vqa`` 1.0 package (MIT, 3.2 MB),
so nothing is downloaded: install it with ``pip install --no-deps easy-vqa==1.0``. It is imported only when a data
module is set up, so ``mma`` works without it.

Every question is asked as multiple choice over the answers of its type (2 yes/no, 3 shapes, 8 colours), answered
with the option's text, and scored per type.
"""

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mma.data.base import Evaluation, MMADataModule, row_chars
from mma.data.images import load_image
from mma.data.prompts import answer_text, question_prompt
from mma.errors import ConfigError, DataError

PromptStyle = Literal["lavin", "llava", "question"]
Split = Literal["train", "test"]

# Options of each question type, in the order they are offered.
OPTIONS = {
    "yes/no": ("yes", "no"),
    "shape": ("circle", "rectangle", "triangle"),
    "colour": ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow"),
}
QUESTION_TYPE = {answer: kind for kind, answers in OPTIONS.items() for answer in answers}
# Sizes of easy-vqa 1.0, to check settings before anything is read.
TRAIN_IMAGES, TEST_QUESTIONS = 4000, 9673
INSTALL = "pip install --no-deps easy-vqa==1.0"
LLAVA_INSTRUCTION = "Answer the question using a single word or phrase."
# The blind control's picture: the mean background of the easy-vqa pictures (measured over the 4,000 training
# pictures: 242.5 per channel), i.e. the picture with its shape taken away. Not mid-grey or black: gray is exactly
# (128, 128, 128) and black (0, 0, 0) in this data, so such a picture would show a gray or black "shape".
BLANK_COLOUR = (242, 242, 242)


@dataclass(frozen=True)
class Question:
    """One question of the package; ``pid`` is ``<split>/<index in the package's list>``."""

    pid: str
    text: str
    answer: str
    image_id: int
    image: Path

    @property
    def kind(self) -> str:
        return QUESTION_TYPE[self.answer]


def _package() -> ModuleType:
    try:
        import easy_vqa
    except ImportError:
        raise DataError(f"the easy-vqa data are not installed: {INSTALL}") from None
    return easy_vqa


def image_paths(package: ModuleType, split: Split, image_ids: set[int]) -> dict[int, Path]:
    """The file of every image id, each checked now, so a broken install stops before training, naming the file."""
    listed = getattr(package, f"get_{split}_image_paths")()  # {image id: path}, from listing the folder
    folder = Path(package.__file__).parent / "data" / split / "images"
    paths = {image_id: Path(listed.get(image_id, folder / f"{image_id}.png")) for image_id in sorted(image_ids)}
    for image_id, path in paths.items():
        if image_id not in listed or not path.is_file():
            raise DataError(f"easy-vqa image {path} is missing; reinstall the package: {INSTALL}")
    return paths


def read_split(split: Split) -> list[Question]:
    """The package's questions of ``split`` with their checked image files; refuses an unknown answer."""
    package = _package()
    texts, answers, image_ids = getattr(package, f"get_{split}_questions")()
    for i, (text, answer) in enumerate(zip(texts, answers, strict=True)):
        if answer not in QUESTION_TYPE:
            raise DataError(f"easy-vqa question {split}/{i} {text!r}: unknown answer {answer!r}; reinstall: {INSTALL}")
    paths = image_paths(package, split, set(image_ids))
    return [
        Question(f"{split}/{i}", text, answer, image_id, paths[image_id])
        for i, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True))
    ]


def split_by_image(questions: list[Question], val_images: int, seed: int) -> tuple[list[Question], list[Question]]:
    """(train, val): every question of ``val_images`` seeded pictures goes to val, so val pictures are unseen."""
    ids = sorted({q.image_id for q in questions})
    held = set(random.Random(f"easyvqa-val-{seed}").sample(ids, val_images))
    return [q for q in questions if q.image_id not in held], [q for q in questions if q.image_id in held]


def proportional(counts: dict[str, int], size: int) -> dict[str, int]:
    """Split ``size`` in proportion to ``counts`` (largest remainders): each share is within 1 of exact."""
    total = sum(counts.values())
    shares = {kind: count * size // total for kind, count in counts.items()}
    by_remainder = sorted(counts, key=lambda kind: counts[kind] * size % total, reverse=True)
    for kind in by_remainder[: size - sum(shares.values())]:
        shares[kind] += 1
    return shares


def indices_by_kind(questions: list[Question]) -> dict[str, list[int]]:
    """Question type -> the positions of its questions in ``questions``."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for index, q in enumerate(questions):
        by_kind[q.kind].append(index)
    return by_kind


def sample_by_kind(
    questions: list[Question], by_kind: dict[str, list[int]], sizes: dict[str, int], rng: random.Random
) -> list[Question]:
    """``sizes[kind]`` of each type's questions (``by_kind``: their positions) drawn by ``rng``, types in sorted
    order; kept in package order."""
    chosen = {index for kind in sorted(by_kind) for index in rng.sample(by_kind[kind], sizes[kind])}
    return [q for index, q in enumerate(questions) if index in chosen]


def stratified_subset(questions: list[Question], size: int, seed: int) -> list[Question]:
    """``size`` seeded questions, each type in proportion to its share of ``questions``; kept in package order."""
    by_kind = indices_by_kind(questions)
    shares = proportional({kind: len(indices) for kind, indices in by_kind.items()}, size)
    return sample_by_kind(questions, by_kind, shares, random.Random(f"easyvqa-test-{seed}"))


def balanced(questions: list[Question], seed: int) -> list[Question]:
    """Equally many questions of each type: each type a seeded subset the size of the rarest type's count, in
    package order (easy-vqa's training questions are 74% yes/no, 13% colour, 13% shape)."""
    by_kind = indices_by_kind(questions)
    sizes = dict.fromkeys(by_kind, min(map(len, by_kind.values())))
    return sample_by_kind(questions, by_kind, sizes, random.Random(f"easyvqa-balanced-{seed}"))


def capped(questions: list[Question], size: int | None, seed: int) -> list[Question]:
    """At most ``size`` seeded questions (all when None or larger), in package order."""
    if size is None or size >= len(questions):
        return questions
    chosen = set(random.Random(f"easyvqa-train-{seed}").sample(range(len(questions)), size))
    return [q for index, q in enumerate(questions) if index in chosen]


def prompt_and_answers(q: Question, style: PromptStyle) -> tuple[str, list[str]]:
    """The prompt and the answer text of every option: ``lavin`` is mma's QCM layout answered ``The answer is
    red.``; ``llava`` is LLaVA's short-answer instruction answered with the bare word."""
    options = list(OPTIONS[q.kind])
    if style == "llava":
        return f"{q.text}\n{LLAVA_INSTRUCTION}", options
    if style == "question":  # the question alone, answered with the bare word: the shortest rows
        return q.text, options
    return question_prompt(q.text, options), [answer_text(options, i, "text") for i in range(len(options))]


class EasyVQA(Dataset):
    """Questions as training samples (prompt + answer) or, with ``evaluate``, evaluation samples (every option
    of the question's type as a candidate, grouped by type). ``blind`` shows a blank picture instead."""

    def __init__(self, questions: list[Question], prompt_style: PromptStyle, evaluate: bool, blind: bool = False):
        self.questions, self.prompt_style = questions, prompt_style
        self.evaluate, self.blind = evaluate, blind

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        q = self.questions[index]
        image = load_image(q.image)
        if self.blind:
            image = Image.new("RGB", image.size, BLANK_COLOUR)
        prompt, answers = prompt_and_answers(q, self.prompt_style)
        target = OPTIONS[q.kind].index(q.answer)
        if not self.evaluate:
            return {"prompt": prompt, "image": image, "answer": answers[target]}
        groups = [q.kind, "all"]
        return {
            "prompt": prompt,
            "image": image,
            "candidates": answers,
            "target": target,
            "groups": groups,
            "pid": q.pid,
        }

    def text_lengths(self) -> list[int]:
        """Characters of every question's row (``TextLengths``): prompt and answer, or every candidate when
        evaluating; no picture is read."""
        lengths = []
        for q in self.questions:
            prompt, answers = prompt_and_answers(q, self.prompt_style)
            if self.evaluate:
                lengths.append(row_chars(prompt, candidates=answers))
            else:
                lengths.append(row_chars(prompt, answers[OPTIONS[q.kind].index(q.answer)]))
        return lengths


class EasyVQADataModule(MMADataModule):
    """easy-VQA from the installed ``easy-vqa`` package; the test also runs over blank pictures (the blind
    control).

    Args:
        prompt_style: ``lavin`` (``Question: ...\\nOptions: (A) ...\\nResponse:``, answered ``The answer is
            red.``), ``llava`` (the question and LLaVA's single-word instruction, answered ``red``) or
            ``question`` (the question alone, answered ``red``: the shortest rows, for CPU demos).
        val_images: training pictures held out, with all their questions, for validation.
        test_size: test questions, a seeded subset stratified by question type; None takes all 9,673.
        train_size: cap on training questions (a seeded subset); None takes all.
        balance_types: train on equally many questions of each type (each a seeded subset of the rarest type's
            size), so shape and colour questions are not outnumbered 3:1 by yes/no ones; the cap applies after.
        seed: seed of the validation pictures, the subsets and the shuffling.
        batch_size: training batch size.
        eval_batch_size: questions per evaluation batch (each question's options are scored after its prompt).
        num_workers: DataLoader worker processes.
        group_by_length: batch training questions of similar prompt + answer length together and evaluate the
            longest first (less padding; a sample's loss and score are unchanged, only its batch mates are).
    """

    def __init__(
        self,
        prompt_style: PromptStyle = "lavin",
        val_images: int = 200,
        test_size: int | None = 1200,
        train_size: int | None = None,
        balance_types: bool = False,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        group_by_length: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, group_by_length)
        if prompt_style not in ("lavin", "llava", "question"):
            raise ConfigError(f"prompt_style={prompt_style!r} must be 'lavin', 'llava' or 'question'")
        if not 1 <= val_images < TRAIN_IMAGES:
            raise ConfigError(f"val_images={val_images} must be in [1, {TRAIN_IMAGES - 1}] (easy-vqa has 4000)")
        if test_size is not None and not 1 <= test_size <= TEST_QUESTIONS:
            raise ConfigError(f"test_size={test_size} must be in [1, {TEST_QUESTIONS}] or null (all)")
        if train_size is not None and train_size < 1:
            raise ConfigError(f"train_size={train_size} must be at least 1 or null (all)")
        self.save_hyperparameters()

    def evaluation(self) -> Evaluation:
        """Accuracy per question type; the test also runs over blank pictures (the blind control)."""
        names = ("test", "blind") if self.with_controls else ("test",)
        return Evaluation(groups=("shape", "colour", "yes/no", "all"), test_names=names, seed=self.seed)

    def setup(self, stage: str) -> None:
        """Read (and so check) the splits the stage needs before any step runs."""
        h = self.hparams
        if stage in ("fit", "validate"):
            train, val = split_by_image(read_split("train"), h.val_images, h.seed)
            train = balanced(train, h.seed) if h.balance_types else train
            self.train_set = EasyVQA(capped(train, h.train_size, h.seed), h.prompt_style, evaluate=False)
            self.val_set = EasyVQA(val, h.prompt_style, evaluate=True)
        if stage == "test":
            test = read_split("test")
            self.test_questions = test if h.test_size is None else stratified_subset(test, h.test_size, h.seed)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(self.test_set(blind)) for blind in (False, True)[: 1 + self.with_controls]]

    def test_set(self, blind: bool = False) -> EasyVQA:
        """The test questions over their pictures, or (``blind``) over blank ones."""
        return EasyVQA(self.test_questions, self.hparams.prompt_style, evaluate=True, blind=blind)
