"""Lightning data module of the built-in synthetic task (``mma.data.synthetic``)."""

from torch.utils.data import DataLoader, Dataset

from mma.adapters.base import CAPTION, INSTRUCTION
from mma.data.base import Evaluation, JointDataset, MMADataModule, row_chars
from mma.data.prompts import AnswerStyle, answer_text, question_prompt
from mma.data.synthetic import IMAGE_TYPES, Problem, blank_like, make_caption, make_problem
from mma.errors import ConfigError

CAPTION_PROMPT = "Describe the picture."

# Stream offsets keep the splits disjoint for any sizes up to a million problems each.
_SPLIT_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000, "predict": 2_000_000}


class SyntheticVQA(Dataset):
    """``size`` problems of one split. Training samples carry the answer; evaluation samples carry every option
    as a candidate answer so the model can score them."""

    def __init__(
        self,
        split: str,
        size: int,
        seed: int,
        image_size: int,
        image_fraction: float,
        answer_style: AnswerStyle,
        blind: bool = False,
    ) -> None:
        self.split, self.size, self.seed = split, size, seed
        self.image_size, self.image_fraction = image_size, image_fraction
        self.answer_style, self.blind = answer_style, blind

    def __len__(self) -> int:
        return self.size

    def problem(self, index: int) -> Problem:
        problem = make_problem(self.seed, _SPLIT_OFFSET[self.split] + index, self.image_size, self.image_fraction)
        return blank_like(problem) if self.blind else problem

    def __getitem__(self, index: int) -> dict:
        p = self.problem(index)
        sample = {"prompt": question_prompt(p.question, p.choices), "image": p.image}
        answer = answer_text(p.choices, p.answer, self.answer_style)
        if self.split == "train":
            return {**sample, "answer": answer}
        if self.split == "predict":
            return {**sample, "answer": None, "question": p.question, "expected": answer}
        groups = [p.category, "all"] if p.image is None else [p.category, "image", "all"]
        candidates = [answer_text(p.choices, i, self.answer_style) for i in range(len(p.choices))]
        return {**sample, "candidates": candidates, "target": p.answer, "groups": groups}

    def text_lengths(self) -> list[int]:
        """Characters of every sample's row (``TextLengths``): prompt and answer, or every candidate."""
        samples = (self[i] for i in range(self.size))  # drawing a problem takes ~0.2 ms
        return [row_chars(s["prompt"], s.get("answer"), s.get("candidates", ())) for s in samples]


class SyntheticCaptions(Dataset):
    """``size`` captioned pictures (``mma.data.synthetic.make_caption``) as image-text training samples."""

    def __init__(self, size: int, seed: int, image_size: int) -> None:
        self.size, self.seed, self.image_size = size, seed, image_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        image, caption = make_caption(self.seed, index, self.image_size)
        return {"prompt": CAPTION_PROMPT, "image": image, "answer": caption}

    def text_lengths(self) -> list[int]:
        """Prompt + caption characters of every sample (``TextLengths``)."""
        return [row_chars(CAPTION_PROMPT, self[i]["answer"]) for i in range(self.size)]


class SyntheticVQADataModule(MMADataModule):
    """Visual multiple-choice QA drawn on the fly: no files, deterministic by seed.

    Args:
        train_size: training problems per epoch.
        val_size: validation problems.
        test_size: test problems; the test also runs them over blank pictures (the blind control).
        image_size: side of the drawn pictures in pixels.
        image_fraction: share of image questions; the rest are text-only.
        caption_fraction: share of training samples that are captioned pictures instead of questions (joint
            training: every batch then holds one source, ``caption`` or ``instruction``); 0 trains on questions
            only.
        answer_style: ``text`` answers with the option's text, ``letter`` with its letter.
        seed: seed of the problem streams.
        batch_size: training batch size.
        group_by_length: batch training samples of similar prompt + answer length together and evaluate the
            longest first (less padding; a sample's loss and score are unchanged, only its batch mates are).
        eval_batch_size: problems per evaluation batch (each problem's options are scored after its prompt).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_size: int = 2000,
        val_size: int = 150,
        test_size: int = 300,
        image_size: int = 64,
        image_fraction: float = 0.75,
        caption_fraction: float = 0.0,
        answer_style: AnswerStyle = "text",
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        group_by_length: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, group_by_length)
        if not 0 <= caption_fraction < 1:
            raise ConfigError(f"caption_fraction={caption_fraction} must be in [0, 1)")
        self.save_hyperparameters()

    def evaluation(self) -> Evaluation:
        """Accuracy per picture type, image / text-only and overall; the test also runs blind."""
        names = ("test", "blind") if self.with_controls else ("test",)
        return Evaluation(groups=(*IMAGE_TYPES, "image", "text", "all"), test_names=names, seed=self.seed)

    def _dataset(self, split: str, size: int, blind: bool = False) -> SyntheticVQA:
        h = self.hparams
        return SyntheticVQA(split, size, h.seed, h.image_size, h.image_fraction, h.answer_style, blind)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        captions = round(h.train_size * h.caption_fraction)
        questions = self._dataset("train", h.train_size - captions)
        if not captions:
            return self.train_loader(questions)
        parts = {INSTRUCTION: questions, CAPTION: SyntheticCaptions(captions, h.seed, h.image_size)}
        return self.train_loader(JointDataset(parts))

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self._dataset("val", self.hparams.val_size))

    def predict_dataloader(self) -> DataLoader:
        """The test problems as open questions: the model generates, ``predictions.jsonl`` records it."""
        return self.eval_loader(self._dataset("predict", self.hparams.test_size))

    def test_dataloader(self) -> list[DataLoader]:
        size = self.hparams.test_size
        blind = [self.eval_loader(self._dataset("test", size, True))] if self.with_controls else []
        return [self.eval_loader(self._dataset("test", size)), *blind]
