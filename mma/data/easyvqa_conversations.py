"""Conversations about easy-vqa pictures, so the two-stage recipe runs on CPU with real pictures.

Stage 1 (alignment) trains on captions: each picture's shape and colour questions name what it shows ("a blue
rectangle"; "a blue shape" or "a rectangle" when the package asks only one of them; pictures asked neither are
left out). Stage 2 (instructions) trains on dialogues: up to ``DIALOGUE_TURNS`` of a picture's questions, in a
seeded order, asked one after another in one conversation and answered with the package's one-word answers.
"""

import random
from collections import defaultdict

from mma.data.conversations import Conversation
from mma.data.easyvqa import Question, Split, read_split
from mma.errors import ConfigError

CAPTION_REQUEST = "Describe the picture briefly."
DIALOGUE_TURNS = 4


def by_picture(questions: list[Question]) -> dict[int, list[Question]]:
    """Questions grouped by picture, pictures in id order, questions in package order."""
    pictures: dict[int, list[Question]] = defaultdict(list)
    for q in questions:
        pictures[q.image_id].append(q)
    return dict(sorted(pictures.items()))


def caption(questions: list[Question]) -> str | None:
    """``a blue rectangle`` from one picture's questions; None when none asks the shape or the colour."""
    colour = next((q.answer for q in questions if q.kind == "colour"), None)
    shape = next((q.answer for q in questions if q.kind == "shape"), None)
    if colour is None and shape is None:
        return None
    return " ".join(["a", *([colour] if colour else []), shape or "shape"])


def caption_conversations(questions: list[Question], split: Split) -> list[Conversation]:
    """One ``describe -> caption`` conversation per picture that has a caption."""
    conversations = []
    for image_id, asked in by_picture(questions).items():
        if (text := caption(asked)) is not None:
            messages = ({"role": "user", "content": CAPTION_REQUEST}, {"role": "assistant", "content": text})
            conversations.append(Conversation(f"easyvqa/{split}/{image_id}", messages, asked[0].image))
    return conversations


def dialogue_conversations(questions: list[Question], split: Split, turns: int = DIALOGUE_TURNS) -> list[Conversation]:
    """One conversation per picture: up to ``turns`` of its questions (a seeded choice and order), each answered."""
    conversations = []
    for image_id, asked in by_picture(questions).items():
        chosen = random.Random(f"easyvqa-dialogue-{split}-{image_id}").sample(asked, min(turns, len(asked)))
        messages = tuple(
            message
            for q in chosen
            for message in ({"role": "user", "content": q.text}, {"role": "assistant", "content": q.answer})
        )
        conversations.append(Conversation(f"easyvqa/{split}/{image_id}", messages, asked[0].image))
    return conversations


def easyvqa_conversations(kind: str, split: Split) -> list[Conversation]:
    """``easyvqa-captions`` or ``easyvqa-dialogue`` conversations over the pictures of ``split``."""
    builders = {"easyvqa-captions": caption_conversations, "easyvqa-dialogue": dialogue_conversations}
    if kind not in builders:
        raise ConfigError(f"unknown easy-vqa conversation kind {kind!r}; known: {sorted(builders)}")
    return builders[kind](read_split(split), split)
