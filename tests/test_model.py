import pytest
import torch
from conftest import collator_for, image, perturb, tiny_model

from mma.adapters import registered_adapters
from mma.adapters.lavin import RouterAdapter
from mma.errors import DataError
from mma.layout import IGNORE_INDEX
from mma.metrics import NORMALISATIONS, GroupedAccuracy, choices_by_normalisation, choose_options


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


def _problems() -> list[dict]:
    """Options of different lengths and counts, with and without a picture."""
    return [
        {"prompt": "What is in the picture?", "image": image(0), "candidates": ["a cat", "dog", "a big red bird"]},
        {"prompt": "A longer question that has no picture at all?", "image": None, "candidates": ["yes", "no"]},
        {"prompt": "Count.", "image": image(2), "candidates": ["one", "two", "three", "four or more"]},
    ]


def _one_row_per_option(problems: list[dict]) -> list[dict]:
    """Each (problem, option) as a sample of its own, answered by the option: the layout scoring used to have."""
    return [
        {"prompt": p["prompt"], "image": p["image"], "answer": option} for p in problems for option in p["candidates"]
    ]


def _row_scores(logprobs: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return logprobs.new_zeros(num_rows).index_add(0, rows, logprobs)


@pytest.mark.parametrize("adapter", registered_adapters())
def test_scoring_each_prompt_once_gives_the_scores_of_one_sequence_per_option(adapter):
    model = tiny_model(adapter)
    perturb(model)
    model.eval()
    collate, problems = collator_for(model), _problems()
    batch = collate(problems)
    with torch.no_grad():
        logprobs, rows = model.option_logprobs(batch)
        reference = model.token_logprobs(collate(_one_row_per_option(problems)))
    num_rows = len(batch["sample_index"])
    torch.testing.assert_close(
        _row_scores(logprobs, rows, num_rows), _row_scores(*reference, num_rows), rtol=0, atol=1e-4
    )
    assert torch.bincount(rows).tolist() == torch.bincount(reference[1]).tolist()  # same tokens per option
    chars = batch["option_chars"]
    chosen = choices_by_normalisation(logprobs, rows, batch["sample_index"], chars)
    expected = choices_by_normalisation(*reference, batch["sample_index"], chars)
    assert all(torch.equal(chosen[name], expected[name]) for name in NORMALISATIONS)


def test_scoring_layout_holds_each_prompt_and_picture_once():
    model = tiny_model("lavin")
    problems = _problems()
    batch = collator_for(model)(problems)
    assert batch["input_ids"].shape[0] == batch["segment_ids"].shape[0] == 3
    assert batch["pixel_values"].shape[0] == 2 and batch["has_image"].tolist() == [True, False, True]
    assert batch["sample_index"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert [row.max().item() for row in batch["segment_ids"]] == [3, 2, 4]
    eos = model.tokenizer.eos_token_id
    for row, problem in enumerate(problems):
        for k, option in enumerate(problem["candidates"], start=1):
            in_option = batch["segment_ids"][row] == k
            tokens, labels = batch["input_ids"][row][in_option].tolist(), batch["labels"][row][in_option].tolist()
            assert model.tokenizer.decode(tokens) == " " + option  # its EOS is predicted, never read
            assert labels == [*tokens[1:], eos]  # each position is labelled with the token it predicts
    assert (batch["labels"][batch["segment_ids"] == 0] == IGNORE_INDEX).all()


def test_lavin_routes_each_option_as_its_own_sequence_would():
    """Routers read the modality token once per problem: the weights equal those of every option's own row."""
    model = tiny_model("lavin")
    perturb(model)
    model.eval()
    collate, problems = collator_for(model), _problems()
    adapter = model.llm.model.layers[1].input_layernorm.adapter
    assert isinstance(adapter, RouterAdapter)
    weights = []
    handle = adapter.register_forward_hook(lambda module, args, output: weights.append(module.routing_weights(args[0])))
    with torch.no_grad():
        batch = collate(problems)
        model.option_logprobs(batch)
        model.token_logprobs(collate(_one_row_per_option(problems)))
    handle.remove()
    packed, per_option = weights
    torch.testing.assert_close(packed[batch["sample_index"]], per_option, rtol=0, atol=1e-6)


def test_scoring_layout_cuts_options_where_one_sequence_would_be_cut():
    model = tiny_model("lavin")
    problems = [{"prompt": "Which?", "image": None, "candidates": ["a rather long option here", "b"]}]
    width = collator_for(model)([{"prompt": "Which?", "image": None, "answer": None}])["input_ids"].shape[1]
    collate = collator_for(model, max_length=width + 4)  # the modality slot, the prompt, 4 tokens
    batch = collate(problems)
    expanded = collate(_one_row_per_option(problems))
    with torch.no_grad():
        scored = len(model.option_logprobs(batch)[0])  # a label per candidate position, a first token per candidate
    assert scored == (expanded["labels"] != IGNORE_INDEX).sum().item() == 4 + 3  # " a r" cut, " b" EOS whole
    one_token = collator_for(model, max_length=width + 1)  # each candidate cut to its first token
    with torch.no_grad():
        logprobs, rows = model.option_logprobs(one_token(problems))
        reference = model.token_logprobs(one_token(_one_row_per_option(problems)))
    torch.testing.assert_close(_row_scores(logprobs, rows, 2), _row_scores(*reference, 2), rtol=0, atol=1e-4)
    with pytest.raises(DataError, match="leaves no room for the answer"):
        collator_for(model, max_length=width)(problems)
