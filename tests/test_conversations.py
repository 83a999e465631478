"""Conversation data: the three file formats (real samples and hand-made records), the per-record checks, mixing,
easy-vqa conversations, and a short Lightning run on the tiny backbones."""

import json
from pathlib import Path

import pytest
import torch
from conftest import LossLog, tiny_config, tiny_trainer
from PIL import Image

from mma.data.conversations import (
    ConversationDataModule,
    ConversationSource,
    mixture,
    read_source,
)
from mma.errors import ConfigError, DataError
from mma.module import MMAModule

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "instructions"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"no instruction samples at {SAMPLES}")


def write(folder: Path, name: str, records: list) -> str:
    path = folder / name
    path.write_text(json.dumps(records))
    return str(path)


def picture(folder: Path, name: str = "cat.png") -> str:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / name)
    return name


def llava(image: str | None, *turns: tuple[str, str], rid: str = "r1") -> dict:
    record = {"id": rid, "conversations": [{"from": who, "value": text} for who, text in turns]}
    return {**record, "image": image} if image else record


@needs_samples
def test_the_alpaca_sample_reads_as_text_only_single_turns():
    conversations = read_source(ConversationSource(str(SAMPLES / "alpaca_en_demo.json")))
    assert len(conversations) == 999
    assert all(c.image is None and [m["role"] for m in c.messages] == ["user", "assistant"] for c in conversations)
    records = json.loads((SAMPLES / "alpaca_en_demo.json").read_text())
    with_input = next(i for i, r in enumerate(records) if r["input"])
    assert (
        conversations[with_input].messages[0]["content"]
        == f"{records[with_input]['instruction']}\n{records[with_input]['input']}"
    )


@needs_samples
def test_the_llava_sample_reads_every_round_with_its_picture(tmp_path):
    records = json.loads((SAMPLES / "llava_instruct_100.json").read_text())
    for record in records:  # the sample ships without its COCO pictures: blank stand-ins
        picture(tmp_path, record["image"])
    source = ConversationSource(str(SAMPLES / "llava_instruct_100.json"), format="llava", image_folder=str(tmp_path))
    conversations = read_source(source)
    assert len(conversations) == 100
    assert sum(m["role"] == "assistant" for c in conversations for m in c.messages) == 458
    assert all(c.image == tmp_path / r["image"] for c, r in zip(conversations, records, strict=True))
    assert not any("<image>" in m["content"] for c in conversations for m in c.messages)
    first = records[0]["conversations"][0]["value"]
    assert conversations[0].messages[0]["content"] == first.replace("<image>", "").strip()


@needs_samples
def test_the_llava_sample_without_its_pictures_names_the_first_missing_one():
    record = json.loads((SAMPLES / "llava_instruct_100.json").read_text())[0]
    with pytest.raises(DataError, match=rf"llava_instruct_100.json: record {record['id']}: picture .* does not exist"):
        read_source(ConversationSource(str(SAMPLES / "llava_instruct_100.json")))


def test_messages_records_with_openai_parts_and_alpaca_history(tmp_path):
    name = picture(tmp_path)
    parts = [{"type": "image_url", "image_url": {"url": name}}, {"type": "text", "text": "What is it?"}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": "A red square."},
    ]
    path = write(tmp_path, "m.json", [{"messages": messages, "images": [name]}])
    [conversation] = read_source(ConversationSource(path))  # format told by the keys
    assert conversation.image == tmp_path / name and conversation.id == "m.json:#0"
    assert [m["content"] for m in conversation.messages] == ["Be brief.", "What is it?", "A red square."]
    alpaca = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["2+2?", "4"]], "system": "Maths."}
    [conversation] = read_source(ConversationSource(write(tmp_path, "a.json", [alpaca]), format="alpaca"))
    assert [m["content"] for m in conversation.messages] == ["Maths.", "2+2?", "4", "And 3+3?", "6"]


BAD_RECORDS = {
    "missing picture": (
        llava("nope.png", ("human", "<image>\nHi"), ("gpt", "Hello")),
        "picture .*nope.png.* not exist",
    ),
    "empty turn": (llava(None, ("human", "Hi"), ("gpt", "  ")), r"turn 1 \(assistant\) is empty"),
    "assistant first": (llava(None, ("gpt", "Hello"), ("human", "Hi")), "an assistant turn comes first"),
    "tag without picture": (
        llava(None, ("human", "<image>\nHi"), ("gpt", "Hello")),
        "<image> in turn 0 but no picture",
    ),
    "two user turns": (llava(None, ("human", "Hi"), ("human", "Hi"), ("gpt", "Yo")), "turn 1 is a user turn where"),
    "unanswered": (llava(None, ("human", "Hi"), ("gpt", "Yo"), ("human", "So?")), "the last user turn has no answer"),
    "unknown speaker": (llava(None, ("bot", "Hi")), "unknown speaker 'bot'"),
    "not a record": ({"id": "r1", "conversations": "Hi"}, r"not a llava record \(TypeError"),
}


@pytest.mark.parametrize("case", BAD_RECORDS, ids=list(BAD_RECORDS))
def test_a_bad_record_is_one_line_naming_the_file_and_the_record(case, tmp_path):
    good = llava(picture(tmp_path), ("human", "<image>\nHi"), ("gpt", "Hello"), rid="fine")
    record, message = BAD_RECORDS[case]
    path = write(tmp_path, "data.json", [good, record])
    with pytest.raises(DataError, match=rf"data.json: record r1: {message}") as err:
        read_source(ConversationSource(path, format="llava"))
    assert "\n" not in str(err.value)


def test_two_pictures_and_a_tag_in_an_answer_are_refused(tmp_path):
    name = picture(tmp_path)
    two = {"id": "r1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(DataError, match="record r1: 2 pictures"):
        read_source(ConversationSource(write(tmp_path, "two.json", [{**two, "images": [name, name]}])))
    tagged = llava(name, ("human", "Hi"), ("gpt", "<image> Yo"))
    with pytest.raises(DataError, match="<image> in a assistant turn"):
        read_source(ConversationSource(write(tmp_path, "tag.json", [tagged])))


def test_bad_sources_fail_when_made():
    with pytest.raises(ConfigError, match="give a path for files"):
        ConversationSource(None, format="llava")
    with pytest.raises(ConfigError, match="weight=0"):
        ConversationSource("x.json", weight=0)
    with pytest.raises(ConfigError, match="at least one source"):
        ConversationDataModule([])


def test_the_union_takes_everything_once_and_a_ratio_takes_shares():
    assert mixture([2, 3], None, 5, seed=0) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    plan = mixture([2, 100], [3.0, 1.0], 8, seed=0)
    assert [k for k, _ in plan].count(0) == 6 and [k for k, _ in plan].count(1) == 2
    first = [i for k, i in plan if k == 0]
    assert sorted(first[:2]) == [0, 1] and first[2:4] == first[:2]  # cycled through a permutation
    assert plan == mixture([2, 100], [3.0, 1.0], 8, seed=0) != mixture([2, 100], [3.0, 1.0], 8, seed=1)


def test_mixed_conversations_report_lengths_so_batches_group_by_length(tmp_path):
    """A short dialogue is not padded to a long instruction's answer: the mixture reports every planned
    conversation's length, and the training sampler groups by it."""
    from mma.data.base import LengthGroupedSampler
    from mma.data.conversations import ConversationDataset, MixedDataset

    short = [llava(picture(tmp_path), ("human", "<image>\nColour?"), ("gpt", "red"), rid=str(i)) for i in range(3)]
    long = [{"instruction": "Tell a story." * (i + 1), "input": "", "output": "Once." * 20} for i in range(2)]
    parts = [
        ConversationDataset(read_source(ConversationSource(write(tmp_path, n, r))))
        for n, r in (("v.json", short), ("t.json", long))
    ]
    mixed = MixedDataset(parts, [(1, 1), (0, 2), (1, 0)])
    assert mixed.text_lengths() == [len("Tell a story." * 2) + 100, len("Colour?red"), len("Tell a story.") + 100]
    data = ConversationDataModule([ConversationSource("unused.json")])
    assert isinstance(data.train_sampler(mixed, 1, 0), LengthGroupedSampler)
    assert MixedDataset([parts[0], [{}]], [(0, 0)]).text_lengths() is None  # a part without lengths


def test_conversations_whose_first_turn_cannot_fit_are_left_out_before_batching(tmp_path):
    """Length-grouped batches put the longest conversations together: those that cannot fit are dropped from the
    plan up front, so no batch is left empty."""
    from conftest import collator_for, tiny_model

    records = [{"instruction": "Say it" + " again" * (40 * i), "input": "", "output": "ok"} for i in range(4)]
    data = ConversationDataModule([ConversationSource(write(tmp_path, "t.json", records))], template="plain")
    data.set_collator(collator_for(tiny_model(), max_length=96))
    data.setup("fit")
    fitting = data.fitting(data.train_set)
    assert [inner for _, inner in fitting.plan] == [0] and len(data.train_set.plan) == 4


def test_easyvqa_captions_and_dialogues():
    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed")
    from mma.data.easyvqa_conversations import easyvqa_conversations

    captions = easyvqa_conversations("easyvqa-captions", "train")
    assert len(captions) == 3816  # pictures asked their shape or their colour
    assert captions[0].messages[1]["content"] == "a blue rectangle" and captions[0].image.name == "0.png"
    dialogues = easyvqa_conversations("easyvqa-dialogue", "train")
    assert len(dialogues) == 4000 and all(2 <= len(d.messages) <= 8 for d in dialogues)


def test_a_short_run_trains_on_mixed_conversations(tmp_path):
    name = picture(tmp_path)
    images = [
        llava(name, ("human", "<image>\nColour?"), ("gpt", "red"), ("human", "Sure?"), ("gpt", "yes"), rid=str(i))
        for i in range(6)
    ]
    texts = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(10)]
    sources = [
        ConversationSource(write(tmp_path, "v.json", images), weight=1.0),
        ConversationSource(write(tmp_path, "t.json", texts), weight=1.0),
    ]
    data = ConversationDataModule(sources, template="plain", mixing="ratio", epoch_size=8, batch_size=4)
    module, losses = MMAModule(tiny_config(), max_length=96), LossLog()
    tiny_trainer(max_steps=2, callbacks=[losses]).fit(module, datamodule=data)
    assert len(losses.losses) == 2 and all(torch.isfinite(torch.tensor(losses.losses)))
    assert data.hparams.sources[0]["path"].endswith("v.json")  # plain data, for weights-only checkpoints
