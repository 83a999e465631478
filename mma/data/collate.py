"""Samples -> padded tensors in the model's sequence layout (``mma.layout.SequenceLayout``).

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
from mma.layout import IGNORE_INDEX, SequenceLayout

_TENSOR_KEYS = ("prompt", "image", "answer", "candidates")


class VLMCollator:
    """Tokenise, lay out, left-pad and stack a list of samples.

    ``num_visual_tokens`` is the number of visual tokens per image; they take slots in the sequence only when the
    layout says so.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        layout: SequenceLayout,
        num_visual_tokens: int,
        max_length: int = 512,
    ) -> None:
        self.tokenizer = tokenizer
        self.transform = transform
        self.layout = layout
        self.modality_token = layout.modality_token
        self.max_length = max_length
        encode = self.encode
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        slots = [layout.image_slot] * num_visual_tokens if layout.visual_in_sequence else []
        self._image_prefix = bos + encode(layout.image_prefix) + slots
        self._text_prefix = bos + encode(layout.text_prefix)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (special tokens written in the text are kept as such)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def __call__(self, samples: list[dict]) -> dict:
        rows = [row for sample in samples for row in self._expand(sample)]
        batch = self.pad([self._sequence(sample, answer) for sample, answer in rows])
        # One transform per picture, shared by every option row of its sample.
        pixels = {id(s): self.pixels(s["image"]) for s in samples if s["image"] is not None}
        images = [pixels[id(sample)] for sample, _ in rows if sample["image"] is not None]
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
        prompt = self.prefix(sample["image"] is not None) + self.encode(self.layout.prompt_separator + sample["prompt"])
        target = (
            self.encode(self.layout.answer_separator + answer) + [self.tokenizer.eos_token_id]
            if answer is not None
            else []
        )
        ids = (prompt + target)[: self.max_length - int(self.modality_token)]
        labels = ([IGNORE_INDEX] * len(prompt) + target)[: len(ids)]
        if answer is not None and all(label == IGNORE_INDEX for label in labels):
            raise DataError(
                f"prompt of {len(prompt)} tokens leaves no room for the answer: raise max_length ({self.max_length})"
            )
        return ids, labels

    def prefix(self, has_image: bool) -> list[int]:
        """The layout's head of a row: BOS, then the image prefix and visual slots, or the text-only prefix."""
        return self._image_prefix if has_image else self._text_prefix

    def pad(self, sequences: list[tuple[list[int], list[int]]]) -> dict:
        """Left-pad, keeping the modality slot at index 0 of every row."""
        head = [self.layout.modality_slot] if self.modality_token else []
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

    def pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """(3, H, W) pixels of a picture: transformed, or taken as they are when already a tensor."""
        return image if isinstance(image, torch.Tensor) else self.transform(image.convert("RGB"))
