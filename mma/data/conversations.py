"""Conversation data: LLaVA, Alpaca and ShareGPT/OpenAI ``messages`` files (and conversations about easy-vqa
pictures), read into one form, checked per record, mixed, and trained turn by turn (``mma.data.dialogue_collate``).

Formats, each a JSON list of records:

- ``llava``: ``{id, image, conversations: [{from: human | gpt, value}]}``, ``<image>`` in a human turn;
- ``alpaca``: ``{instruction, input, output}`` (optional ``system`` and ``history: [[question, answer], ...]``, as
  LLaMA-Factory writes them), text only;
- ``messages``: ``{messages: [{role: system | user | assistant, content}], images: [path]}``, the content a string
  (``<image>`` marks the picture) or OpenAI's list of ``{type: text, text}`` / ``{type: image...}`` parts.

Every record becomes a ``Conversation``: messages with ``<image>`` removed and the picture file resolved against
the source's image folder. A record that cannot be trained on (a missing picture, an empty turn, an assistant turn
first, turns that do not alternate, ``<image>`` without a picture, ...) stops the run with one ``DataError`` line
naming the file and the record.
"""

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader, Dataset

from mma.data.base import MMADataModule, text_lengths
from mma.data.collate import VLMCollator
from mma.data.dialogue_collate import ConversationCollator, Message, TemplateName
from mma.data.images import load_image
from mma.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ConversationFormat = Literal["auto", "llava", "alpaca", "messages", "easyvqa-captions", "easyvqa-dialogue"]
FILE_FORMATS = ("auto", "llava", "alpaca", "messages")
IMAGE_TAG = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One conversation: ``id`` (``file#record``, for errors), its messages in order (``<image>`` removed) and its
    picture file, if any."""

    id: str
    messages: tuple[Message, ...]
    image: Path | None = None

    def undecoded(self) -> dict:
        """The conversation as a collator's sample with the picture's path in place of the picture: enough to lay
        it out and measure it (``ConversationCollator.fits``) without decoding it."""
        return {"messages": list(self.messages), "image": self.image, "id": self.id}


@dataclass
class ConversationSource:
    """One source of conversations.

    Args:
        path: a JSON file (a list of records); None for the easy-vqa formats, which build conversations from the
            installed ``easy-vqa`` package's training pictures.
        format: ``llava``, ``alpaca``, ``messages``, ``auto`` (told by the first record's keys), or
            ``easyvqa-captions`` (stage-1 captions such as "a blue rectangle") / ``easyvqa-dialogue`` (several
            questions about one picture as one conversation).
        image_folder: folder that relative picture paths are resolved against (default: the file's folder).
        weight: share of this source in an epoch under ``mixing: ratio`` (relative to the other sources).
        limit: read only the first ``limit`` records (None: all).
    """

    path: str | None = None
    format: ConversationFormat = "auto"
    image_folder: str | None = None
    weight: float = 1.0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.format not in (*FILE_FORMATS, "easyvqa-captions", "easyvqa-dialogue"):
            raise ConfigError(f"conversation source format={self.format!r} is unknown")
        if (self.path is None) == (self.format in FILE_FORMATS):
            raise ConfigError(f"conversation source format={self.format!r}: give a path for files, none for easy-vqa")
        if self.weight <= 0:
            raise ConfigError(f"conversation source weight={self.weight} must be positive")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"conversation source limit={self.limit} must be at least 1 or null (all)")


def read_source(source: ConversationSource) -> list[Conversation]:
    """Every conversation of ``source``, checked."""
    if source.format.startswith("easyvqa"):
        # Imported here: the easy-vqa builders make ``Conversation``s, so they import this module.
        from mma.data.easyvqa_conversations import easyvqa_conversations

        return easyvqa_conversations(source.format, "train")[: source.limit]
    path = Path(source.path)
    records = load_records(path)[: source.limit]
    fmt = detect_format(records[0], path) if source.format == "auto" else source.format
    folder = Path(source.image_folder) if source.image_folder else path.parent
    return [_conversation(record, index, fmt, path, folder) for index, record in enumerate(records)]


def load_records(path: Path) -> list[dict]:
    """The JSON list in ``path``; a missing, invalid or empty file is a ``DataError`` naming it."""
    if not path.is_file():
        raise DataError(f"conversation file {path} does not exist")
    try:
        records = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} must hold a non-empty JSON list of records")
    return records


def detect_format(record: dict, path: Path) -> str:
    keys = set(record) if isinstance(record, dict) else set()
    if "conversations" in keys:
        return "llava"
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise DataError(f"{path}: cannot tell the format from the first record's keys {sorted(keys)}: set format")


def _conversation(record: dict, index: int, fmt: str, path: Path, folder: Path) -> Conversation:
    """One record as a checked ``Conversation``; any problem is one line naming the file and the record."""
    rid = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
    try:
        messages, images = PARSERS[fmt](record)
        return checked(Conversation(f"{path.name}:{rid}", tuple(messages), _picture(images, folder)))
    except DataError as err:
        raise DataError(f"{path}: record {rid}: {err}") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: record {rid}: not a {fmt} record ({type(err).__name__}: {err})") from None


def _picture(images: list[str], folder: Path) -> Path | None:
    if len(images) > 1:
        raise DataError(f"{len(images)} pictures: mma lays out one picture per conversation")
    if not images:
        return None
    path = folder / images[0]
    if not path.is_file():
        raise DataError(f"picture {str(path)!r} does not exist")
    return path


def _llava(record: dict) -> tuple[list[Message], list[str]]:
    messages = []
    for turn in record["conversations"]:
        if turn["from"] not in LLAVA_ROLES:
            raise DataError(f"unknown speaker {turn['from']!r} (known: {sorted(LLAVA_ROLES)})")
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
    image = record.get("image")
    return messages, [image] if image else list(record.get("images") or [])


def _alpaca(record: dict) -> tuple[list[Message], list[str]]:
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    history = [
        message
        for question, answer in record.get("history") or []
        for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    ]
    question = "\n".join(part for part in (record["instruction"], record.get("input")) if part)
    return [
        *system,
        *history,
        {"role": "user", "content": question},
        {"role": "assistant", "content": record["output"]},
    ], []


def _messages(record: dict) -> tuple[list[Message], list[str]]:
    messages = []
    for message in record["messages"]:
        content = message["content"]
        if isinstance(content, list):  # OpenAI parts: text parts joined, a picture part becomes the tag
            content = "\n".join(part["text"] if part["type"] == "text" else IMAGE_TAG for part in content)
        messages.append({"role": message["role"], "content": content})
    return messages, list(record.get("images") or [])


PARSERS = {"llava": _llava, "alpaca": _alpaca, "messages": _messages}


def checked(conversation: Conversation) -> Conversation:
    """``conversation`` with ``<image>`` removed from its turns, after checking it can be trained on: known roles,
    a system message only first, then user and assistant turns alternating from a user turn to an answer, no empty
    turn, and at most one ``<image>``, in a user turn of a conversation that has a picture."""
    messages = conversation.messages
    tags = [i for i, m in enumerate(messages) if IMAGE_TAG in m["content"]]
    if tags and conversation.image is None:
        raise DataError(f"{IMAGE_TAG} in turn {tags[0]} but no picture")
    if len(tags) > 1 or any(messages[i]["content"].count(IMAGE_TAG) > 1 for i in tags):
        raise DataError(f"more than one {IMAGE_TAG}: mma lays out one picture per conversation")
    if tags and messages[tags[0]]["role"] != "user":
        raise DataError(f"{IMAGE_TAG} in a {messages[tags[0]]['role']} turn: only a user turn can show the picture")
    cleaned = tuple({"role": m["role"], "content": _untagged(m["content"])} for m in messages)
    _check_turns(cleaned)
    return Conversation(conversation.id, cleaned, conversation.image)


def _untagged(text: str) -> str:
    """Text without ``<image>`` and the line break that joined it (as LLaVA's and LaVIN's data code strip it)."""
    return text.replace(f"{IMAGE_TAG}\n", "").replace(f"\n{IMAGE_TAG}", "").replace(IMAGE_TAG, "").strip()


def _check_turns(messages: tuple[Message, ...]) -> None:
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise DataError(f"turn {i} has the unknown role {message['role']!r} (known: {ROLES})")
        if not message["content"]:
            raise DataError(f"turn {i} ({message['role']}) is empty")
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise DataError("no turns")
    if turns[0]["role"] == "assistant":
        raise DataError("an assistant turn comes first: a conversation starts with a user turn")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(
                f"turn {i + len(messages) - len(turns)} is a {message['role']} turn where a {expected} turn belongs"
            )
    if turns[-1]["role"] != "assistant":
        raise DataError("the last user turn has no answer")


class ConversationDataset(Dataset):
    """Conversations as samples ``{"messages", "image", "id"}``; pictures are decoded when a sample is taken."""

    def __init__(self, conversations: list[Conversation]) -> None:
        self.conversations = conversations

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        c = self.conversations[index]
        image = load_image(c.image) if c.image is not None else None
        return {"messages": [dict(m) for m in c.messages], "image": image, "id": c.id}

    def text_lengths(self) -> list[int]:
        """Characters of every conversation's turns (``TextLengths``); no picture is read."""
        return [sum(len(m["content"]) for m in c.messages) for c in self.conversations]


def mixture(sizes: list[int], weights: list[float] | None, total: int, seed: int) -> list[tuple[int, int]]:
    """(source, index) of every sample of an epoch.

    ``weights`` None is the union (LaVIN's mix: every sample of every source once). Otherwise ``total`` samples,
    source k taking ``weights[k] / sum(weights)`` of them (largest remainders), drawn from a seeded permutation of
    the source and cycled through it when its share is larger than the source. The plan is fixed for the run, so
    the sampler's shuffling and mid-epoch resume work on it as on any dataset.
    """
    if weights is None:
        return [(k, i) for k, size in enumerate(sizes) for i in range(size)]
    exact = [w * total / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    for k in sorted(range(len(sizes)), key=lambda k: exact[k] - shares[k], reverse=True)[: total - sum(shares)]:
        shares[k] += 1
    plan = []
    for k, (size, share) in enumerate(zip(sizes, shares, strict=True)):
        order = random.Random(f"mixture-{seed}-{k}").sample(range(size), size)
        plan += [(k, order[j % size]) for j in range(share)]
    return plan


class MixedDataset(Dataset):
    """Samples of several datasets in the order of a ``mixture`` plan."""

    def __init__(self, parts: list[Dataset], plan: list[tuple[int, int]]) -> None:
        self.parts, self.plan = parts, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict:
        part, inner = self.plan[index]
        return self.parts[part][inner]

    def text_lengths(self) -> list[int] | None:
        """Every planned sample's ``TextLengths`` length, or None when a part reports none."""
        parts = [text_lengths(part) for part in self.parts]
        if any(lengths is None for lengths in parts):
            return None
        return [parts[part][inner] for part, inner in self.plan]


class ConversationDataModule(MMADataModule):
    """Multi-turn conversations from several sources, every assistant turn trained (training only: evaluate with
    ``mma.dialogue_eval`` or a task's own data module).

    Args:
        sources: where the conversations come from (``ConversationSource``: path, format, image folder, weight).
        template: ``chat`` (the tokenizer's chat template), ``plain`` (LaVIN's ``Instruction: ... Response:``) or
            ``caption`` (LLaVA's pretraining form: only the answers after the picture).
        mixing: ``union`` (LaVIN: every conversation of every source once per epoch, shuffled together) or
            ``ratio`` (each source's share of an epoch by its ``weight``).
        epoch_size: conversations per epoch under ``ratio`` (None: as many as the sources hold together).
        seed: seed of the mixture and the shuffling.
        batch_size: training batch size.
        eval_batch_size: kept for the common data-module signature (no evaluation data here).
        num_workers: DataLoader worker processes.
        group_by_length: batch conversations of similar length together (a short easy-vqa dialogue is not padded
            to a long Alpaca answer; a sample's loss is unchanged, only its batch mates are).
    """

    def __init__(
        self,
        sources: list[ConversationSource],
        template: TemplateName = "chat",
        mixing: Literal["union", "ratio"] = "union",
        epoch_size: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        group_by_length: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, group_by_length)
        if not sources:
            raise ConfigError("the conversation data module needs at least one source")
        if mixing not in ("union", "ratio"):
            raise ConfigError(f"mixing={mixing!r} must be 'union' or 'ratio'")
        if epoch_size is not None and epoch_size < 1:
            raise ConfigError(f"epoch_size={epoch_size} must be at least 1 or null")
        self.sources = list(sources)
        # Plain data only: checkpoints are read with ``weights_only=True``.
        hyper = dict(sources=[asdict(s) for s in self.sources], template=template, mixing=mixing)
        self.save_hyperparameters({**hyper, "epoch_size": epoch_size, "seed": seed, "batch_size": batch_size})

    def set_collator(self, collator: VLMCollator) -> None:
        """The model's collator, wrapped to lay out conversations turn by turn with this data's template."""
        super().set_collator(ConversationCollator(collator, self.hparams.template))

    def setup(self, stage: str) -> None:
        """Read and check every source before any step runs."""
        if stage != "fit":
            return
        parts = [read_source(source) for source in self.sources]
        for source, part in zip(self.sources, parts, strict=True):
            log.info("conversations: %d from %s (%s)", len(part), source.path or "easy-vqa", source.format)
        sizes = [len(part) for part in parts]
        ratio = self.hparams.mixing == "ratio"
        weights = [s.weight for s in self.sources] if ratio else None
        plan = mixture(sizes, weights, self.hparams.epoch_size or sum(sizes), self.hparams.seed)
        self.train_set = MixedDataset([ConversationDataset(part) for part in parts], plan)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.fitting(self.train_set))

    def fitting(self, mixed: MixedDataset) -> MixedDataset:
        """The planned conversations whose first turn fits the model's ``max_length``; the others could only be
        left out batch by batch (and a length-grouped batch of the longest would hold nothing to train)."""
        fits: dict[tuple[int, int], bool] = {}
        for key in mixed.plan:
            if key not in fits:
                fits[key] = self.collator.fits(mixed.parts[key[0]].conversations[key[1]].undecoded())
        kept = [key for key in mixed.plan if fits[key]]
        if len(kept) < len(mixed.plan):
            log.warning(
                "%d of %d planned conversations left out: not even their first turn fits max_length %d",
                len(mixed.plan) - len(kept),
                len(mixed.plan),
                self.collator.base.max_length,
            )
        return MixedDataset(mixed.parts, kept)
