"""``mma merge``: the folded LLM, loaded by plain transformers, computes what the adapted model computes."""

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mma.adapters import LaVIN
from mma.backbones import load_llm
from mma.checkpoint import save_adapter
from mma.cli import main
from mma.commands.merge import merge_to_folder
from mma.errors import ConfigError
from mma.layout import MODALITY_SLOT
from mma.merge import merge_adapter, mergeable_adapters

# float32 backbones: folding reorders sums (W (I + M^T A) n instead of W (n + M^T (A n + a))); measured 2e-6.
TOLERANCE = 1e-4


def _adapted(tmp_path, name: str = "lavin", **settings):
    """A tiny model with adapter weights far from zero, so the adapters change the logits a lot."""
    model = tiny_model(name, **settings)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model, save_adapter(model, tiny_config(name, **settings), tmp_path / "adapter")


def _text_logits(model, tokens: torch.Tensor, has_image: bool) -> torch.Tensor:
    """Logits of a text-only sample in the VLM's layout: ``[modality] [BOS] tokens``, the modality slot dropped
    (``[BOS] tokens`` when the layout has none)."""
    head = int(model.layout.modality_token)
    input_ids = torch.cat([torch.tensor([[MODALITY_SLOT]]), tokens], dim=1) if head else tokens
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "has_image": torch.tensor([has_image]),
    }
    with torch.no_grad():
        return model.llm.get_output_embeddings()(model.hidden_states(batch)[:, head:])


@pytest.mark.parametrize("modality", ["text", "image"])
def test_merged_lavin_loads_in_transformers_and_matches(modality, tmp_path):
    model, folder = _adapted(tmp_path)
    out = tmp_path / "merged"
    main(["merge", "--adapter", str(folder), "--out", str(out), "--modality", modality])
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer("Image: N/A\nWhich is a fruit? (A) car (B) pear", add_special_tokens=False).input_ids
    tokens = torch.tensor([[tokenizer.bos_token_id, *text]])  # as the collator lays out a text-only prompt
    assert merged.config.attention_bias
    with torch.no_grad():
        logits = merged(tokens).logits
    expected = _text_logits(model, tokens, has_image=modality == "image")
    torch.testing.assert_close(logits, expected, rtol=0, atol=TOLERANCE)
    other_modality = _text_logits(model, tokens, has_image=modality != "image")
    bare, _ = load_llm(tiny_config().llm)
    with torch.no_grad():
        unadapted = bare(tokens).logits
    assert (logits - other_modality).abs().max() > 100 * TOLERANCE
    assert (logits - unadapted).abs().max() > 1000 * TOLERANCE


def test_merge_of_a_projector_only_adapter_is_refused(tmp_path):
    _, folder = _adapted(tmp_path, "none")
    with pytest.raises(ConfigError, match="adapter 'none' cannot be merged into the LLM; mergeable: lavin"):
        merge_to_folder(folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_lavin_merge_needs_a_modality(tmp_path):
    _, folder = _adapted(tmp_path)
    with pytest.raises(ConfigError, match="choose the modality to fold for"):
        merge_to_folder(folder, tmp_path / "merged")


def test_packed_quantized_weights_are_refused(tmp_path):
    model, _ = _adapted(tmp_path)
    layer = model.llm.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.zeros(64, 32, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ConfigError, match=r"packed quantized weights \(model.layers.0.self_attn.q_proj.weight"):
        merge_adapter(model, LaVIN(), "text")


# Settings under which each foldable method has only foldable parts (V2's prompts are an attention branch).
MERGEABLE_SETTINGS = {
    "llama-adapter-v2": dict(prompt_layers=0, visual_layers=0, targets=["q_proj", "v_proj", "up_proj"])
}


def test_every_method_but_the_projector_floor_and_memvp_can_fold():
    """MemVP's memory depends on the image (tests/test_memvp.py checks the refusal)."""
    assert mergeable_adapters() == ["lavin", "llama-adapter-v2", "lora"]


@pytest.mark.parametrize("name", mergeable_adapters())
def test_merged_equals_unmerged_for_every_foldable_method(tmp_path, name):
    """Each registered fold (LaVIN for text, LoRA by peft's own merge, V2's bias/scale and norms into weights,
    biases and norm weights: a partly targeted family gets zero biases) gives a plain transformers LLM whose
    logits are the adapted model's on a text-only prompt."""
    model, folder = _adapted(tmp_path, name, **MERGEABLE_SETTINGS.get(name, {}))
    out = tmp_path / "merged"
    main(["merge", "--adapter", str(folder), "--out", str(out), "--modality", "text"])
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer("Image: N/A\nWhich is a fruit? (A) car (B) pear", add_special_tokens=False).input_ids
    tokens = torch.tensor([[tokenizer.bos_token_id, *text]])
    with torch.no_grad():
        logits = merged(tokens).logits
        unadapted = load_llm(tiny_config().llm)[0](tokens).logits
    torch.testing.assert_close(logits, _text_logits(model, tokens, has_image=False), rtol=0, atol=TOLERANCE)
    assert not any(part in key for key in merged.state_dict() for part in ("lora", "delta", "scale", "adapter"))
    assert (logits - unadapted).abs().max() > 1000 * TOLERANCE


def test_llama_adapter_v2_prompts_are_refused(tmp_path):
    _, folder = _adapted(tmp_path, "llama-adapter-v2")
    with pytest.raises(ConfigError, match="adaption prompts are an attention branch a plain LLaMA has no weights"):
        merge_to_folder(folder, tmp_path / "merged")
