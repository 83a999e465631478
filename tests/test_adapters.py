"""Every registered adapter through the same invariants (timm-style: one parametrised test per property)."""

import pytest
import torch
from conftest import collator_for, tiny_model

from mma.adapters import adapter_parameter_names, get_adapter, registered_adapters
from mma.errors import ConfigError
from mma.fingerprint import backbone_parameters

ADAPTERS = registered_adapters()


def _perturb(model, seed: int = 1) -> None:
    """Move trainable weights off their zero init so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("name", ADAPTERS)
def test_identity_at_init(name, samples):
    """The adapted model scores answers exactly as the projector-only model on the same backbones, with the same
    sequence layout (early fusion takes the visual tokens out of the sequence), does."""
    base, adapted = tiny_model("none", seed=0), tiny_model(name, seed=0)
    base.visual_in_sequence = adapted.visual_in_sequence
    base_logprobs, _ = base.token_logprobs(collator_for(base)(samples))
    adapted_logprobs, _ = adapted.token_logprobs(collator_for(adapted)(samples))
    torch.testing.assert_close(adapted_logprobs, base_logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ADAPTERS)
def test_gradients_reach_only_and_all_adapter_parameters(name, samples):
    model = tiny_model(name)
    _perturb(model)
    model.train()
    model.loss(collator_for(model)(samples)).backward()
    trainable = adapter_parameter_names(model)
    for param_name, p in model.named_parameters():
        if param_name in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, param_name
        else:
            assert not p.requires_grad and p.grad is None, param_name


@pytest.mark.parametrize("name", ADAPTERS)
def test_backbones_stay_in_eval_while_adapters_train(name):
    model = tiny_model(name).train()
    trainable_modules = {n.rsplit(".", 1)[0] for n in adapter_parameter_names(model)}
    for module_name, module in model.named_modules():
        if module_name in trainable_modules:
            assert module.training, module_name
    assert not model.llm.model.layers[0].self_attn.training
    assert not model.vit.blocks[0].attn.training


@pytest.mark.parametrize("name", ADAPTERS)
def test_state_dict_keys_are_stable(name):
    """Two builds give the same keys; every backbone weight is still there under a name that maps back to the
    bare backbone's, and every other key is an adapter's."""
    first, second = tiny_model(name, seed=0), tiny_model(name, seed=1)
    assert list(first.state_dict()) == list(second.state_dict())
    bare = tiny_model("none")
    backbone_names = {f"llm.{k}" for k in backbone_parameters(bare.llm)} | {
        f"vit.{k}" for k in backbone_parameters(bare.vit)
    }
    adapted_names = {f"llm.{k}" for k in backbone_parameters(first.llm)} | {
        f"vit.{k}" for k in backbone_parameters(first.vit)
    }
    assert adapted_names == backbone_names
    frozen = {n for n, p in first.named_parameters() if not p.requires_grad}
    assert {n for n, _ in first.named_parameters()} - frozen == adapter_parameter_names(first)


def test_unknown_adapter_and_setting_are_named():
    with pytest.raises(
        ConfigError, match="unknown adapter 'lavinn'; registered adapters: lavin, llama-adapter-v2, lora, none"
    ):
        get_adapter("lavinn")
    with pytest.raises(ConfigError, match=r"adapter 'lavin' has no setting\(s\) \['rank'\]"):
        get_adapter("lavin").make_config({"rank": 4})


def test_settings_given_as_text_are_typed_and_wrong_types_named():
    """CLI overrides such as ``--model.model.adapter_config.temperature 5`` arrive as text."""
    config = get_adapter("lavin").make_config({"temperature": "5", "hidden": "16", "router": "false"})
    assert config.temperature == 5.0 and isinstance(config.temperature, float)
    assert config.hidden == 16 and config.router is False
    with pytest.raises(ConfigError, match="setting 'temperature' must be float, got 'hot'"):
        get_adapter("lavin").make_config({"temperature": "hot"})
    with pytest.raises(ConfigError, match="setting 'hidden' must be int, got 8.5"):
        get_adapter("lavin").make_config({"hidden": 8.5})
