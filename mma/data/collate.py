"""Samples -> padded tensors in the model's sequence layout (see ``mma.model``).

A sample is a dict with ``prompt`` (str), ``image`` (PIL image, (3, H, W) tensor or None) and either ``answer``
(str or None, for training and generation) or ``candidates`` (list of answer strings, for option scoring; their
lengths in characters go along as ``option_chars`` for per-character normalisation).
Other keys (``category``, ``target``, ids) are passed through as lists.
"""

from collections.abc import Callable

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mma.errors import DataError
from mma.model import IGNORE_INDEX, IMAGE_SLOT, MODALITY_SLOT

_TENSOR_KEYS = ("prompt", "image", "answer", "candidates")
# The text around a sample in LaVIN's layout (see ``mma.model``); exported adapters record it.
IMAGE_PREFIX, TEXT_PREFIX, PROMPT_SEPARATOR, ANSWER_SEPARATOR = "Image: ", "Image: N/A", "\n", " "


class VLMCollator:
    """Tokenise, lay out, left-pad and stack a list of samples."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        transform: Callable[[Image.Image], torch.Tensor],
        num_visual_tokens: int,
        modality_token: bool,
        max_length: int = 512,
    ) -> None:
        self.tokenizer = tokenizer
        self.transform = transform
        self.modality_token = modality_token
        self.max_length = max_length
        encode = self._encode
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._image_prefix = bos + encode(IMAGE_PREFIX) + [IMAGE_SLOT] * num_visual_tokens
        self._text_prefix = bos + encode(TEXT_PREFIX)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def __call__(self, samples: list[dict]) -> dict:
        rows = [row for sample in samples for row in self._expand(sample)]
        batch = self._pad([self._sequence(sample, answer) for sample, answer in rows])
        images = [self._pixels(sample["image"]) for sample, _ in rows if sample["image"] is not None]
        batch["pixel_values"] = torch.stack(images) if images else None
        batch["has_image"] = torch.tensor([sample["image"] is not None for sample, _ in rows])
        if "candidates" in samples[0]:
            batch["sample_index"] = torch.tensor([i for i, s in enumerate(samples) for _ in s["candidates"]])
            batch["option_chars"] = torch.tensor([len(c) for s in samples for c in s["candidates"]])
        for key in samples[0].keys() - set(_TENSOR_KEYS):
            batch[key] = [sample[key] for sample in samples]
        return batch

    @staticmethod
    def _expand(sample: dict) -> list[tuple[dict, str | None]]:
        if "candidates" in sample:
            return [(sample, candidate) for candidate in sample["candidates"]]
        return [(sample, sample.get("answer"))]

    def _sequence(self, sample: dict, answer: str | None) -> tuple[list[int], list[int]]:
        prefix = self._image_prefix if sample["image"] is not None else self._text_prefix
        prompt = prefix + self._encode(PROMPT_SEPARATOR + sample["prompt"])
        target = self._encode(ANSWER_SEPARATOR + answer) + [self.tokenizer.eos_token_id] if answer is not None else []
        ids = (prompt + target)[: self.max_length - int(self.modality_token)]
        labels = ([IGNORE_INDEX] * len(prompt) + target)[: len(ids)]
        if answer is not None and all(label == IGNORE_INDEX for label in labels):
            raise DataError(
                f"prompt of {len(prompt)} tokens leaves no room for the answer: raise max_length ({self.max_length})"
            )
        return ids, labels

    def _pad(self, sequences: list[tuple[list[int], list[int]]]) -> dict:
        """Left-pad, keeping the modality slot at index 0 of every row."""
        head = [MODALITY_SLOT] if self.modality_token else []
        width = max(len(ids) for ids, _ in sequences)
        input_ids, labels, mask = [], [], []
        for ids, row_labels in sequences:
            pad = width - len(ids)
            input_ids.append(head + [self.tokenizer.pad_token_id] * pad + ids)
            labels.append([IGNORE_INDEX] * (len(head) + pad) + row_labels)
            mask.append([1] * len(head) + [0] * pad + [1] * len(ids))
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }

    def _pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return image if isinstance(image, torch.Tensor) else self.transform(image.convert("RGB"))
