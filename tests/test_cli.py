"""The ``mma`` command: recipes parse, parameter counts are exact, bad recipes fail with one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest

from mma.adapters import get_adapter, registered_adapters
from mma.build import build_model, load_preset
from mma.cli import config_cli, main
from mma.commands.params import count_parameters
from mma.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_parses(recipe):
    cli = config_cli(str(recipe))
    assert cli.model.model_config.adapter


@pytest.mark.parametrize(("recipe", "expected"), [("lavin-7b", 3_781_296), ("lavin-13b", 5_390_080)])
def test_lavin_trainable_parameters_match_the_paper(recipe, expected):
    module = config_cli(str(ROOT / "recipes" / "scienceqa" / f"{recipe}.yaml")).model
    counts = count_parameters(build_model(module.model_config, device="meta"))
    assert sum(trainable for trainable, _ in counts.values()) == expected


def test_params_command_prints_the_count(capsys):
    main(["params", "--config", str(ROOT / "recipes" / "scienceqa" / "lavin-7b.yaml")])
    assert "trainable parameters: 3,781,296 of" in capsys.readouterr().out


def _mma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mma.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_unknown_adapter_is_one_clear_error():
    result = _mma("params", "--config", "recipes/scienceqa/lavin-7b.yaml", "--model.model.adapter", "lavinn")
    assert result.returncode == 2
    assert (
        "mma: error: unknown adapter 'lavinn'; registered adapters: lavin, llama-adapter-v2, lora, none"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_missing_backbone_path_fails_before_training(tmp_path):
    result = _mma(
        "fit",
        "--config",
        "recipes/demo.yaml",
        "--model.model.llm.path",
        str(tmp_path / "missing"),
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert result.returncode == 2
    assert f"mma: error: LLM path '{tmp_path / 'missing'}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


PRESETS = sorted((ROOT / "adapters").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_adapter_preset_is_valid_for_its_method(preset):
    """A preset is named ``<adapter>[-variant].yaml``; its settings must all be known to that adapter."""
    name = max((n for n in registered_adapters() if preset.stem.startswith(n)), key=len)
    get_adapter(name).make_config(load_preset(str(preset)))


def test_progress_bar_can_be_turned_off():
    trainer = config_cli("recipes/demo.yaml", ["--trainer.enable_progress_bar=false"]).trainer
    assert trainer.progress_bar_callback is None
    assert config_cli("recipes/demo.yaml").trainer.progress_bar_callback is not None


def test_missing_preset_is_named():
    with pytest.raises(ConfigError, match="adapter preset 'adapters/nope.yaml' does not exist"):
        load_preset("adapters/nope.yaml")
