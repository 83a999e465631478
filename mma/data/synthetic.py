"""A built-in visual multiple-choice QA task, generated on the fly and deterministic by seed.

Image questions can only be answered by looking at the picture (colour, shape, count, position of drawn
objects); text-only questions ask which word belongs to a category, which a pretrained LM already half knows.
The mix gives the router both modalities. Samples use ScienceQA's shape: question, choices, answer index.
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
POSITIONS = ("left", "middle", "right")
WORDS = {
    "animal": ("dog", "cat", "horse", "rabbit", "tiger", "sheep"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "pear"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "boat"),
    "tool": ("hammer", "saw", "wrench", "drill", "shovel", "axe"),
}
IMAGE_TYPES = ("colour", "shape", "count", "position")
QUESTION_TYPES = (*IMAGE_TYPES, "text")
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class Problem:
    """One question: ``image`` is None for text-only questions."""

    question: str
    choices: list[str]
    answer: int
    category: str
    image: Image.Image | None


def make_problem(seed: int, index: int, image_size: int, image_fraction: float) -> Problem:
    """The ``index``-th problem of the stream ``seed``; the same arguments always give the same problem."""
    rng = random.Random(seed * 1_000_003 + index)
    if rng.random() >= image_fraction:
        return _text_problem(rng)
    kind = rng.choice(IMAGE_TYPES)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count = rng.randrange(3) + 1 if kind == "count" else 1
    slots = rng.sample(range(3), count) if kind == "count" else [rng.randrange(3)]
    image = _draw(rng, image_size, colour, shape, slots)
    if kind == "colour":
        return _choice(rng, "What colour is the shape?", colour, list(COLOURS), kind, image)
    if kind == "shape":
        return _choice(rng, "What shape is in the picture?", shape, list(SHAPES), kind, image)
    if kind == "count":
        return _choice(rng, "How many shapes are in the picture?", COUNTS[count - 1], list(COUNTS), kind, image)
    return _choice(rng, "Where is the shape?", POSITIONS[slots[0]], list(POSITIONS), kind, image)


def make_caption(seed: int, index: int, image_size: int) -> tuple[Image.Image, str]:
    """The ``index``-th captioned picture of the stream ``seed``: one to three shapes of one colour, described by
    count, colour, shape and, for a single shape, position (``"two red squares"``, ``"one blue circle, left"``).
    Captions name every attribute the image questions ask about: image-text data for joint training."""
    rng = random.Random(seed * 1_000_033 + index)
    colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randrange(3) + 1
    slots = rng.sample(range(3), count)
    image = _draw(rng, image_size, colour, shape, slots)
    caption = f"{COUNTS[count - 1]} {colour} {shape}{'s' if count > 1 else ''}"
    return image, caption if count > 1 else f"{caption}, {POSITIONS[slots[0]]}"


def blank_like(problem: Problem) -> Problem:
    """The same question over a blank picture: the blind control of image questions."""
    if problem.image is None:
        return problem
    blank = Image.new("RGB", problem.image.size, BACKGROUND)
    return Problem(problem.question, problem.choices, problem.answer, problem.category, blank)


def _choice(rng: random.Random, question: str, answer: str, pool: list[str], kind: str, image) -> Problem:
    """Three options: the answer and two distractors from ``pool``, shuffled."""
    choices = [answer, *rng.sample([c for c in pool if c != answer], 2)]
    rng.shuffle(choices)
    return Problem(question, choices, choices.index(answer), kind, image)


def _text_problem(rng: random.Random) -> Problem:
    category, *others = rng.sample(list(WORDS), 3)
    answer = rng.choice(WORDS[category])
    choices = [answer, *(rng.choice(WORDS[other]) for other in others)]
    rng.shuffle(choices)
    article = "an" if category[0] in "aeiou" else "a"
    return Problem(f"Which of these is {article} {category}?", choices, choices.index(answer), "text", None)


def _draw(rng: random.Random, size: int, colour: str, shape: str, slots: list[int]) -> Image.Image:
    """Objects of one colour and shape in horizontal slots (left / middle / right) at a random height."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    radius = size // 8
    for slot in slots:
        cx = (2 * slot + 1) * size // 6
        cy = rng.randint(radius + 1, size - radius - 2)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLOURS[colour]
            )
    return image
