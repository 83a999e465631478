"""Packed training batches (several samples per row, each on its own) against one row per sample."""

import pytest
import torch
from conftest import collator_for, image, perturb, tiny_model

from mma.adapters import registered_adapters
from mma.data.collate import first_fit
from mma.layout import IGNORE_INDEX


def _samples() -> list[dict]:
    """Pictured and text-only samples of different lengths, in no order."""
    texts = ["Hi?", "What colour is the big shape on the left?", "Count.", "Which is a fruit? (A) car (B) pear"]
    answers = ["yes", "red", "three shapes", "pear"]
    return [
        {"prompt": text, "answer": answer, "image": image(i) if i % 2 else None}
        for i, (text, answer) in enumerate(zip(texts * 2, answers[::-1] + answers, strict=True))
    ]


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("adapter", registered_adapters())
def test_packed_rows_give_the_loss_and_gradients_of_one_row_per_sample(adapter):
    model = tiny_model(adapter)
    perturb(model)
    model.eval()  # no dropout: the two passes must see the same function
    samples = _samples()
    packed, plain = collator_for(model, pack=True)(samples), collator_for(model)(samples)
    assert packed["input_ids"].shape[0] < len(samples)  # something was packed
    if model.layout.visual_in_sequence:  # a row holds several pictures: their order in pixel_values matters
        pictured = [(row == model.layout.image_slot).sum() // model.num_visual_tokens for row in packed["input_ids"]]
        assert max(pictured) >= 2
    loss, grads = _loss_and_grads(model, plain)
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-5)
    for packed_grad, grad in zip(packed_grads, grads, strict=True):
        torch.testing.assert_close(packed_grad, grad, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.sequence_logprobs(packed), model.sequence_logprobs(plain), rtol=0, atol=1e-5)


def test_packed_rows_keep_modalities_apart_and_fit_max_length():
    model = tiny_model("lavin")
    samples = _samples()
    batch = collator_for(model, max_length=128, pack=True)(samples)
    assert batch["input_ids"].shape[1] <= 128
    ids = batch["sample_ids"]
    assert sorted(set(ids.flatten().tolist()) - {0}) == list(range(1, len(samples) + 1))
    for row, has_image in zip(ids, batch["has_image"], strict=True):
        members = {i - 1 for i in row.tolist() if i}
        assert {samples[i]["image"] is not None for i in members} == {bool(has_image)}
    labelled = batch["labels"] != IGNORE_INDEX
    assert labelled.sum() == (collator_for(model)(samples)["labels"] != IGNORE_INDEX).sum()
    _, positions = model.packed_attention(batch)
    first = ids != torch.nn.functional.pad(ids, (1, 0))[:, :-1]
    assert (positions[first & (ids > 0)] == 0).all()  # every sample starts at position 0


def test_early_fusion_keeps_each_pictured_sample_in_a_row_of_its_own():
    model = tiny_model("llama-adapter-v2")
    assert not model.layout.visual_in_sequence
    batch = collator_for(model, pack=True)(_samples())
    for row, has_image in zip(batch["sample_ids"], batch["has_image"], strict=True):
        assert not has_image or len(set(row.tolist()) - {0}) == 1
    assert batch["pixel_values"].shape[0] == int(batch["has_image"].sum())


def test_first_fit_decreasing():
    assert first_fit({"a": 5, "b": 7, "c": 3, "d": 2, "e": 4}, capacity=10) == [["b", "c"], ["a", "e"], ["d"]]
    assert first_fit({}, capacity=10) == []
