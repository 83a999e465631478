"""Every registered adapter through the same invariants (timm-style: one parametrised test per property)."""

import dataclasses

import pytest
import torch
from conftest import assert_backbones_in_eval, collator_for, perturb, tiny_model

from mma.adapters import adapter_parameter_names, get_adapter, registered_adapters, settings_from_spec, settings_spec
from mma.adapters.base import adapter_owned_modules
from mma.errors import ConfigError
from mma.fingerprint import backbone_parameters

ADAPTERS = registered_adapters()


@pytest.mark.parametrize("name", ADAPTERS)
def test_identity_at_init(name, samples):
    """The adapted model scores answers exactly as the projector-only model on the same backbones, with the same
    sequence layout (early fusion takes the visual tokens out of the sequence), does."""
    adapted = tiny_model(name, seed=0)
    base = tiny_model("none", seed=0)
    base.layout = dataclasses.replace(base.layout, visual_in_sequence=adapted.layout.visual_in_sequence)
    base_logprobs, _ = base.token_logprobs(collator_for(base)(samples))
    adapted_logprobs, _ = adapted.token_logprobs(collator_for(adapted)(samples))
    torch.testing.assert_close(adapted_logprobs, base_logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ADAPTERS)
def test_gradients_reach_only_and_all_adapter_parameters(name, samples):
    model = tiny_model(name)
    perturb(model)
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
    assert_backbones_in_eval(model)
    wrapped_attention = [m for n, m in model.named_modules() if n.endswith("self_attn.attention")]
    assert all(not m.training for m in wrapped_attention)
    dropouts = [m for m in adapter_owned_modules(model) if isinstance(m, torch.nn.Dropout)]
    assert all(m.training for m in dropouts)


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
        ConfigError, match="unknown adapter 'lavinn'; registered adapters: lavin, llama-adapter-v2, lora, memvp, none"
    ):
        get_adapter("lavinn")
    with pytest.raises(ConfigError, match=r"adapter 'lavin' has no setting\(s\) \['rank'\]"):
        settings_from_spec({"class_path": "mma.adapters.LaVIN", "init_args": {"rank": 4}})


@pytest.mark.parametrize("name", ADAPTERS)
def test_settings_round_trip_through_their_spec(name):
    settings = get_adapter(name).settings()
    assert settings_from_spec(settings_spec(settings)) == settings
    assert settings_from_spec({"adapter": name, "adapter_config": {}}) == settings  # adapters of format 1


def test_no_two_methods_share_a_setting_name():
    """jsonargparse carries the settings a new method shares by name over from the recipe's method when
    ``--model.model.adapter`` switches it (LaVIN's ``vit: true`` would turn on a LoRA ``vit``), so names stay
    disjoint."""
    seen: dict[str, str] = {}
    for name in ADAPTERS:
        for field in dataclasses.fields(get_adapter(name).settings):
            assert field.name not in seen, f"{name} and {seen[field.name]} both have {field.name!r}"
            seen[field.name] = name
