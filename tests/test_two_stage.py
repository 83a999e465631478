"""Two stages chained: stage 1's exported projector starts stage 2 (``init_from`` / ``load_parts``), other backbones
and other visual settings are refused, and the shipped two-stage recipes say what they run."""

import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLM, perturb, tiny_config, tiny_model, tiny_trainer
from PIL import Image

from mma.backbones import LLMSpec
from mma.checkpoint import adapter_weights, load_parts, save_adapter
from mma.data.conversations import ConversationDataModule, ConversationSource
from mma.errors import AdapterError, BackboneMismatch
from mma.model import VisualConfig
from mma.module import MMAModule
from mma.recipe import config_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "llava-style"


def projector(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in adapter_weights(model).items() if k.startswith("projector.")}


@pytest.fixture
def stage1(tmp_path) -> tuple[dict[str, torch.Tensor], Path]:
    """A projector-only (NoAdapter) model with moved weights, exported."""
    model = tiny_model("none")
    perturb(model, seed=3)
    return projector(model), save_adapter(model, tiny_config("none"), tmp_path / "stage1")


def test_stage_two_starts_from_stage_one_projector_and_nothing_else(stage1):
    weights, folder = stage1
    module = MMAModule(tiny_config("lavin"), init_from=str(folder))
    module.configure_model()
    fresh = tiny_model("lavin")
    for name, value in adapter_weights(module.model).items():
        expected = weights[name] if name in weights else adapter_weights(fresh)[name]
        assert torch.equal(value, expected), name
    assert module.hparams.init_from == str(folder)


def test_other_backbones_are_refused(stage1):
    _, folder = stage1
    other = dataclasses.replace(tiny_config("lavin"), llm=LLMSpec(config=TINY_LLM, seed=1))
    with pytest.raises(BackboneMismatch, match="belongs to other backbones"):
        MMAModule(other, init_from=str(folder)).configure_model()


def test_other_visual_settings_and_absent_parts_are_refused(stage1):
    _, folder = stage1
    other = dataclasses.replace(tiny_config("lavin"), visual=VisualConfig(tokens="cls", every=2, projector_hidden=16))
    with pytest.raises(AdapterError, match="trained with visual settings"):
        MMAModule(other, init_from=str(folder)).configure_model()
    model = tiny_model("lavin")
    with pytest.raises(AdapterError, match=r"missing tensors \[modality_embedding.weight\]"):
        load_parts(model, folder, ("modality_embedding",))
    with pytest.raises(AdapterError, match=r"this model has no \['modality_embedding'\]"):
        load_parts(tiny_model("none"), folder, ("projector", "modality_embedding"))


def test_both_stages_train_on_conversations(tmp_path):
    """Stage 1 trains the projector on captions; its export starts stage 2, which moves adapters and projector."""
    Image.new("RGB", (32, 32), (0, 90, 200)).save(tmp_path / "p.png")
    records = [
        {"id": str(i), "image": "p.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, *answers]}
        for i, answers in enumerate([[{"from": "gpt", "value": "a blue square"}]] * 8)
    ]
    (tmp_path / "c.json").write_text(json.dumps(records))
    source = [ConversationSource(str(tmp_path / "c.json"))]
    L.seed_everything(0, verbose=False)
    first = MMAModule(tiny_config("none"), max_length=64)
    tiny_trainer(max_steps=2).fit(first, datamodule=ConversationDataModule(source, template="caption", batch_size=4))
    folder = save_adapter(first.model, tiny_config("none"), tmp_path / "stage1")
    second = MMAModule(tiny_config("lavin"), max_length=64, init_from=str(folder))
    second.configure_model()
    assert all(torch.equal(v, projector(first.model)[k]) for k, v in projector(second.model).items())
    tiny_trainer(max_steps=2).fit(second, datamodule=ConversationDataModule(source, template="plain", batch_size=4))
    assert not all(torch.equal(v, projector(first.model)[k]) for k, v in projector(second.model).items())


@pytest.mark.parametrize(
    ("stage", "method", "template"), [("1-align", "none", "caption"), ("2-instruct", "lavin", "plain")]
)
def test_the_7b_recipes_chain_stage_one_into_stage_two(stage, method, template):
    cli = config_cli(str(RECIPES / f"stage{stage}.yaml"))
    assert type(cli.model.model_config.adapter).name == method and cli.datamodule.hparams.template == template
    assert cli.model.hparams.init_from == ("runs/llava-style/stage1-adapter" if stage.startswith("2") else None)
