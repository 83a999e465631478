"""Samples -> padded tensors in the model's sequence layout (``mma.layout.SequenceLayout``).

A sample is a dict with ``prompt`` (str), ``image`` (PIL image, (3, H, W) tensor or None) and either ``answer``
(str or None, for training and generation) or ``candidates`` (list of answer strings, for option scoring; their
lengths in characters go along as ``option_chars`` for per-character normalisation).
Other keys (``category``, ``target``, ids) are passed through as lists.

Samples with ``candidates`` get the scoring layout: one row per sample holding its prompt once and then every
candidate's tokens, each candidate a segment of its own (``segment_ids``: 0 for the prompt and padding, k for the
k-th candidate), so the prompt (and the picture) is encoded once, not once per option. A candidate's last token
(its EOS) is only ever predicted, so the row leaves it out: each candidate position is labelled with the token it
predicts, and a candidate's first token, predicted from the prompt's last position, is the one at its start::

    [modality] [pad ...] [BOS] "Image: " [visual tokens] "\\n" prompt | " " option 1 | " " option 2 | ...

``VisionLanguageModel.option_logprobs`` lets each candidate attend to the prompt and to itself only and restarts
its positions where the prompt ends, which gives the scores of one full sequence per candidate.

With ``pack``, training samples are packed several to a row of at most ``max_length`` tokens (``sample_ids``: the
sample's number + 1, 0 on padding and the modality slot); ``VisionLanguageModel.packed_attention`` keeps each on
its own, so the loss and its gradients are those of one row per sample with less padding.
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
    layout says so. ``pack`` packs training samples (all with answers) several to a row (``_pack``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        layout: SequenceLayout,
        num_visual_tokens: int,
        max_length: int = 512,
        pack: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.pack = pack
        self.transform = transform
        self.layout = layout
        self.modality_token = layout.modality_token
        self.max_length = max_length
        encode = self.encode
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        slots = [layout.image_slot] * layout.sequence_slots(num_visual_tokens)
        self._image_prefix = bos + encode(layout.image_prefix) + slots
        self._text_prefix = bos + encode(layout.text_prefix)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def __call__(self, samples: list[dict]) -> dict:
        scoring = "candidates" in samples[0]
        rows = [[i] for i in range(len(samples))]  # the samples in each row
        if scoring:
            batch = self._scoring_rows(samples)
        elif self.pack and all(sample.get("answer") is not None for sample in samples):
            sequences = [self._sequence(sample, sample["answer"]) for sample in samples]
            rows = self._pack(sequences, [sample["image"] is not None for sample in samples])
            batch = self._packed_rows(sequences, rows)
        else:
            batch = self.pad([self._sequence(sample, sample.get("answer")) for sample in samples])
        # Pictures in row order, each transformed once: a row's visual token slots take them in turn.
        images = [self.pixels(samples[i]["image"]) for row in rows for i in row if samples[i]["image"] is not None]
        batch["pixel_values"] = torch.stack(images) if images else None
        batch["has_image"] = torch.tensor([samples[row[0]]["image"] is not None for row in rows])
        if scoring:
            batch["sample_index"] = torch.tensor([i for i, s in enumerate(samples) for _ in s["candidates"]])
            batch["option_chars"] = torch.tensor([len(c) for s in samples for c in s["candidates"]])
        for key in samples[0].keys() - set(_TENSOR_KEYS):
            batch[key] = [sample[key] for sample in samples]
        return batch

    def prefix(self, has_image: bool) -> list[int]:
        """The layout's head of a row: BOS, the image or text prefix and, in the sequence, the visual slots."""
        return self._image_prefix if has_image else self._text_prefix

    def _prompt(self, sample: dict) -> list[int]:
        return self.prefix(sample["image"] is not None) + self.encode(self.layout.prompt_separator + sample["prompt"])

    def _target(self, answer: str) -> list[int]:
        return self.encode(self.layout.answer_separator + answer) + [self.tokenizer.eos_token_id]

    def _sequence(self, sample: dict, answer: str | None) -> tuple[list[int], list[int]]:
        prompt = self._prompt(sample)
        target = self._target(answer) if answer is not None else []
        ids = (prompt + target)[: self._room]
        labels = ([IGNORE_INDEX] * len(prompt) + target)[: len(ids)]
        if answer is not None and all(label == IGNORE_INDEX for label in labels):
            raise DataError(
                f"prompt of {len(prompt)} tokens leaves no room for the answer: raise max_length ({self.max_length})"
            )
        return ids, labels

    @property
    def _room(self) -> int:
        """Tokens a sequence may have besides the modality slot."""
        return self.max_length - int(self.modality_token)

    def _scoring_rows(self, samples: list[dict]) -> dict:
        """The scoring layout: per sample its prompt, then each candidate but its last token as segment k = 1, 2,
        ...; a candidate position's label is the token it predicts. ``max_length`` bounds prompt + one candidate,
        as it bounds each sequence in training."""
        rows, segments = [], []
        for sample in samples:
            ids = self._prompt(sample)
            room = max(0, self._room - len(ids))
            if not room:
                raise DataError(
                    f"prompt of {len(ids)} tokens leaves no room for the answer: raise max_length ({self.max_length})"
                )
            labels, row_segments = [IGNORE_INDEX] * len(ids), [0] * len(ids)
            for k, candidate in enumerate(sample["candidates"], start=1):
                target = self._target(candidate)[:room]
                read = target[:-1] or target  # a one-token candidate keeps its token: its segment must exist
                predicted = target[1:] or [IGNORE_INDEX]
                ids, labels, row_segments = ids + read, labels + predicted, row_segments + [k] * len(read)
            rows.append((ids, labels))
            segments.append(row_segments)
        return self.pad(rows, segments)

    def _pack(self, sequences: list[tuple[list[int], list[int]]], has_image: list[bool]) -> list[list[int]]:
        """Sample numbers in each packed row: first-fit decreasing into rows of ``max_length``, pictured and
        text-only samples apart (the row's modality token speaks for all its samples); under early fusion each
        pictured sample keeps a row of its own (the adapter layers take one picture's visual tokens per row)."""
        rows = []
        for picture in (True, False):
            members = [i for i, flag in enumerate(has_image) if flag == picture]
            if picture and not self.layout.visual_in_sequence:
                rows += [[i] for i in members]
            else:
                rows += first_fit({i: len(sequences[i][0]) for i in members}, self._room)
        return rows

    def _packed_rows(self, sequences: list[tuple[list[int], list[int]]], rows: list[list[int]]) -> dict:
        packed, sample_ids = [], []
        for row in rows:
            packed.append(([t for i in row for t in sequences[i][0]], [t for i in row for t in sequences[i][1]]))
            sample_ids.append([i + 1 for i in row for _ in sequences[i][0]])
        return self.pad(packed, sample_ids, key="sample_ids")

    def pad(
        self,
        sequences: list[tuple[list[int], list[int]]],
        segments: list[list[int]] | None = None,
        key: str = "segment_ids",
    ) -> dict:
        """Left-pad, keeping the modality slot at index 0 of every row; ``segments`` (scoring layout, packed
        samples) become ``key``, 0 on the slot and the padding."""
        head = [self.layout.modality_slot] if self.modality_token else []
        width = max(len(ids) for ids, _ in sequences)
        input_ids, labels, mask = [], [], []
        for ids, row_labels in sequences:
            pad = width - len(ids)
            input_ids.append(head + [self.tokenizer.pad_token_id] * pad + ids)
            labels.append([IGNORE_INDEX] * (len(head) + pad) + row_labels)
            mask.append([1] * len(head) + [0] * pad + [1] * len(ids))
        batch = {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
        if segments is not None:
            batch[key] = torch.tensor([[0] * (len(head) + width - len(row)) + row for row in segments])
        return batch

    def pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return image if isinstance(image, torch.Tensor) else self.transform(image.convert("RGB"))


def first_fit(lengths: dict[int, int], capacity: int) -> list[list[int]]:
    """Keys of ``lengths`` in bins whose lengths sum to at most ``capacity``, longest first into the first bin
    with room (first-fit decreasing)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for key in sorted(lengths, key=lambda k: -lengths[k]):
        target = next((b for b, space in enumerate(free) if space >= lengths[key]), len(bins))
        if target == len(bins):
            bins.append([])
            free.append(capacity)
        bins[target].append(key)
        free[target] -= lengths[key]
    return bins
