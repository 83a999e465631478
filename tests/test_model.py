import pytest
import torch
from conftest import collator_for, image, perturb, tiny_model

from mma.layout import IGNORE_INDEX
from mma.metrics import GroupedAccuracy, choose_options


def _prompts() -> list[dict]:
    return [
        {"prompt": "What is in the picture?", "answer": None, "image": image(0)},
        {"prompt": "Name a fruit, please, in one word.", "answer": None, "image": None},
        {"prompt": "Count.", "answer": None, "image": image(2)},
    ]


@pytest.mark.parametrize("adapter", ["lavin", "llama-adapter-v2"])
def test_generation_with_kv_cache_matches_full_recompute(adapter):
    model = tiny_model(adapter)
    perturb(model)
    model.eval()
    batch = collator_for(model)(_prompts())
    cached = model.generate(batch, max_new_tokens=12, use_cache=True)
    recomputed = model.generate(batch, max_new_tokens=12, use_cache=False)
    assert cached == recomputed
    assert all(len(tokens) > 0 for tokens in cached)


def test_left_padding_does_not_change_a_sample():
    """A sample scores the same alone and batched with longer ones (positions ignore padding)."""
    model = tiny_model("lavin")
    perturb(model)
    model.eval()
    collate = collator_for(model)
    short = {"prompt": "Hi.", "answer": "yes", "image": image(3)}
    long = {"prompt": "A much longer prompt that forces padding onto the short one.", "answer": "no", "image": None}
    alone = model.sequence_logprobs(collate([short]))
    batched = model.sequence_logprobs(collate([short, long]))
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-5)


def test_collator_layout_and_labels(samples):
    model = tiny_model("lavin")
    collate = collator_for(model)
    batch = collate(samples)
    tokenizer = model.tokenizer
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["has_image"].tolist() == [True, False, True]
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(labelled) == " " + sample["answer"] + tokenizer.eos_token
    image_slots = (batch["input_ids"] == -2).sum(1).tolist()
    assert image_slots == [model.num_visual_tokens, 0, model.num_visual_tokens]
    text_row = tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()][1:].tolist())
    assert text_row.startswith(tokenizer.bos_token + "Image: N/A\nWhich is a fruit?")


def test_option_choice_and_grouped_accuracy():
    scores = torch.tensor([0.1, 0.9, 0.2, -1.0, -0.5])  # sample 0: 3 options, sample 1: 2 options
    chosen = choose_options(scores, torch.tensor([0, 0, 0, 1, 1]))
    assert chosen.tolist() == [1, 1]
    metric = GroupedAccuracy(["colour", "image", "text", "all"])
    metric.update(torch.tensor([True, False, True]), [["colour", "image", "all"], ["text", "all"], ["colour", "x"]])
    result = {k: float(v) for k, v in metric.compute().items()}
    assert result["colour"] == 1.0 and result["image"] == 1.0 and result["text"] == 0.0
    assert abs(result["all"] - 0.5) < 1e-9
