"""The sequence layout: how a sample becomes the LLM's token sequence, declared once per adapter method.

A method's settings produce one ``SequenceLayout`` before the model is built (``AdapterSettings.layout``); the
model, the collator and the exporter all read that object, so no flag is flipped after construction and every
consumer agrees on where the modality token and the visual tokens go::

    [modality] [BOS] image_prefix [visual tokens] prompt_separator prompt answer_separator answer [EOS]   image
    [modality] [BOS] text_prefix prompt_separator prompt answer_separator answer [EOS]                    text-only

``[modality]`` is there only with ``modality_token``; the visual token slots only with ``visual_in_sequence``
(early fusion sends the visual tokens to adapter layers instead), or one slot for the image's class token with
``class_token_in_sequence`` (ADEM-VL: the patches go to the layers, the class token into the sequence).
"""

from dataclasses import asdict, dataclass

from mma.errors import ConfigError

MODALITY_SLOT = -1  # input id placeholder for the modality token
IMAGE_SLOT = -2  # input id placeholder for each visual token
IGNORE_INDEX = -100  # label of a position that carries no loss


@dataclass(frozen=True)
class SequenceLayout:
    """Where things go in the LLM sequence (LaVIN's layout by default).

    Args:
        modality_token: a learned token at position 0 saying whether the sample has an image; no other position
            attends to it (LaVIN's routers read it).
        visual_in_sequence: visual tokens fill slots after ``image_prefix``; False sends them to the adapter
            layers as keyword arguments (LLaMA-Adapter V2's early fusion) and leaves no slots.
        class_token_in_sequence: with ``visual_in_sequence`` False, one slot after ``image_prefix`` holds the
            image's class token through a projector of its own (ADEM-VL); the patch tokens still go to the layers.
        image_prefix: text before the visual tokens of an image sample.
        text_prefix: text in their place for a text-only sample.
        prompt_separator: text between the prefix and the prompt.
        answer_separator: text between the prompt and the answer.
    """

    modality_token: bool = False
    visual_in_sequence: bool = True
    class_token_in_sequence: bool = False
    image_prefix: str = "Image: "
    text_prefix: str = "Image: N/A"
    prompt_separator: str = "\n"
    answer_separator: str = " "
    modality_slot: int = MODALITY_SLOT
    image_slot: int = IMAGE_SLOT

    def __post_init__(self) -> None:
        if self.visual_in_sequence and self.class_token_in_sequence:
            raise ConfigError("class_token_in_sequence adds the class token beside visual tokens sent to the layers")

    def sequence_slots(self, visual_tokens: int) -> int:
        """Slots an image sample has in the sequence: one per visual token, one for the class token, or none."""
        return visual_tokens if self.visual_in_sequence else int(self.class_token_in_sequence)

    def describe(self) -> dict:
        """Plain data for exported adapters: the fields and the two row templates."""
        tail = f"{self.prompt_separator!r} prompt {self.answer_separator!r} answer [EOS]"
        head = "[modality] " if self.modality_token else ""
        slots = " [visual tokens]" if self.visual_in_sequence else " [class token]" * self.class_token_in_sequence
        rows = {
            "image": f"{head}[BOS] {self.image_prefix!r}{slots} {tail}",
            "text": f"{head}[BOS] {self.text_prefix!r} {tail}",
        }
        return {**asdict(self), "rows": rows}
