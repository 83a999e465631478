"""The ``mma`` command: recipes parse, parameter counts are exact, bad recipes fail with one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mma.adapters import AdapterSettings
from mma.build import build_model
from mma.callbacks import LastCheckpoint
from mma.cli import LIGHTNING_COMMANDS, SUBCOMMANDS, main
from mma.parameters import count_parameters
from mma.recipe import config_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_parses_and_builds_on_the_meta_device(recipe):
    """Typed settings, the layout they declare, the model they build (no weights allocated), and a ``last.ckpt``
    written every few minutes of training."""
    cli = config_cli(str(recipe))
    config = cli.model.model_config
    assert [cb._every_n_train_steps for cb in cli.trainer.callbacks if isinstance(cb, LastCheckpoint)] == [
        yaml.safe_load(recipe.read_text())["checkpoint"]["every_n_train_steps"]
    ]
    assert isinstance(config.adapter, AdapterSettings)
    model = build_model(config, device="meta")
    assert model.layout == config.adapter.layout()
    assert (model.modality_embedding is not None) == model.layout.modality_token


@pytest.mark.parametrize(("recipe", "expected"), [("lavin-7b", 3_781_296), ("lavin-13b", 5_390_080)])
def test_lavin_trainable_parameters_match_the_paper(recipe, expected):
    module = config_cli(str(ROOT / "recipes" / "scienceqa" / f"{recipe}.yaml")).model
    counts = count_parameters(build_model(module.model_config, device="meta"))
    assert sum(trainable for trainable, _ in counts.values()) == expected


@pytest.mark.parametrize(("recipe", "expected"), [("memvp-7b", 3_870_848), ("memvp-13b", 5_477_504)])
def test_memvp_trainable_parameters_match_the_authors_code(recipe, expected, capsys):
    """The recipe headers derive the counts (paper: 3.9M / 5.5M); the authors' script prints 8,192 / 10,240 more
    for a modality embedding that their forward never uses."""
    main(["params", "--config", str(ROOT / "recipes" / "scienceqa" / f"{recipe}.yaml")])
    assert f"trainable parameters: {expected:,} of" in capsys.readouterr().out


def test_adem_vl_preset_adds_the_class_token_projector_to_the_memvp_count(capsys):
    """ADEM-VL 7B (paper: 4.5M) = MemVP's 3,870,848 with the same 320 slots + its class-token projector
    1024 -> 128 -> 4096 with biases (131,200 + 528,384)."""
    recipe, preset = ROOT / "recipes" / "scienceqa" / "memvp-7b.yaml", ROOT / "adapters" / "memvp-adem-vl.yaml"
    main(["params", "--config", str(recipe), "--model.model.adapter", str(preset)])
    assert f"trainable parameters: {3_870_848 + 659_584:,} of" in capsys.readouterr().out


def test_params_command_prints_the_count(capsys):
    main(["params", "--config", str(ROOT / "recipes" / "scienceqa" / "lavin-7b.yaml")])
    assert "trainable parameters: 3,781,296 of" in capsys.readouterr().out


def _mma(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **env} if env else None
    return subprocess.run([sys.executable, "-m", "mma.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_unknown_adapter_is_refused_when_parsed():
    result = _mma("params", "--config", "recipes/scienceqa/lavin-7b.yaml", "--model.model.adapter", "LaVINN")
    assert result.returncode != 0
    assert "LaVINN" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.model.adapter.hiden=4", "hiden"),
        ("--model.model.adapter.groups=0", "groups=0 must be >= 1 and divide hidden"),
        ("--model.model.adapter.hidden=0", "hidden=0 must be at least 1"),
        ("--model.model.adapter.dropout=2.0", "dropout=2.0 must be in [0, 1)"),
        ("--model.model.adapter.temperature=0", "temperature=0.0 must be greater than 0"),
        ("--model.model.adapter.temperature=hot", "temperature"),
    ],
)
def test_bad_adapter_settings_fail_when_the_recipe_is_parsed(override, message):
    """Each fails before any weight loads (``fit`` on the demo recipe would otherwise read a 135M GGUF first)."""
    result = _mma("fit", "--config", "recipes/demo.yaml", override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_lora_rank_is_checked_when_parsed():
    result = _mma("params", "--config", "recipes/scienceqa/qlora-7b.yaml", "--model.model.adapter.rank=0")
    assert result.returncode != 0 and "rank=0 must be at least 1" in result.stderr


def test_fit_help_documents_every_adapter_setting():
    result = _mma("fit", "--model.model.adapter.help", "LaVIN")
    assert result.returncode == 0
    assert "--model.model.adapter.temperature" in result.stdout
    assert "router softmax temperature" in result.stdout


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
def test_every_adapter_preset_parses_as_the_adapter_of_a_recipe(preset):
    """A preset is named ``<adapter>[-variant].yaml``; the parser types and range-checks it like inline settings."""
    config = config_cli("recipes/scienceqa/lavin-7b.yaml", ["--model.model.adapter", str(preset)]).model.model_config
    assert preset.stem.startswith(type(config.adapter).name)


def test_progress_bar_can_be_turned_off():
    trainer = config_cli("recipes/demo.yaml", ["--trainer.enable_progress_bar=false"]).trainer
    assert trainer.progress_bar_callback is None
    assert config_cli("recipes/demo.yaml").trainer.progress_bar_callback is not None


def test_missing_preset_is_named():
    result = _mma("params", "--config", "recipes/demo.yaml", "--model.model.adapter", "adapters/nope.yaml")
    assert result.returncode != 0 and "adapters/nope.yaml" in result.stderr


def test_demo_prints_every_group_before_after_blind_and_chance():
    result = _mma("demo", "--config", "tests/sweep_fixtures/tiny.yaml", "--trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "before tuning" in out and "blind control" in out and "chance" in out
    for group in ("colour", "shape", "count", "position", "image", "text", "all"):
        assert f"│ {group} " in out
    assert "optimizer steps: 3" in out


def test_help_version_and_own_commands_help_load_no_heavy_library():
    """`mma --help`, `--version` and `mma <own command> --help` answer without importing torch or Lightning."""
    commands = [["--help"], ["--version"], *([name, "--help"] for name in SUBCOMMANDS)]
    code = (
        "import sys, contextlib, io\nfrom mma.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n        main(argv)\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr


def test_lightning_command_help_is_cached_and_the_cached_answer_loads_no_heavy_library(tmp_path):
    """`mma fit --help` builds LightningCLI's parser once (about 10 s here); later calls print the same text from
    the cache, keyed by mma's sources and the libraries' versions, without importing torch or Lightning."""
    env = {"MMA_CACHE": str(tmp_path)}
    first = _mma("fit", "--help", env=env)
    assert first.returncode == 0 and "--model.model.adapter" in first.stdout
    code = (
        "import sys\nfrom mma.cli import main\nmain(['fit', '--help'])\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules), file=sys.stderr)"
    )
    cached = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}
    )
    assert cached.stdout == first.stdout
    assert cached.stderr.strip() == "[]"


def test_help_lists_every_command_and_an_unknown_one_is_named():
    listed = _mma("--help").stdout
    assert all(f"  {name} " in listed for name in [*LIGHTNING_COMMANDS, *SUBCOMMANDS])
    result = _mma("fitt", "--config", "recipes/demo.yaml")
    assert result.returncode == 2
    assert result.stderr == (
        "mma: error: unknown command 'fitt'; commands: fit, validate, test, predict, params, demo, export, ask, "
        "chat, merge, sweep (see mma --help)\n"
    )


NOISE = ("Seed set", "GPU available", "TPU available", "Tip:", "LeafSpec", "args parameter", "kernels-community")


def test_fit_prints_mma_lines_only_and_leaves_the_working_directory_clean(tmp_path):
    """Lightning's tips, device and seed lines, library warnings and module table are off unless --verbose; a run
    with ``logger: false`` writes only under runs/ (git-ignored)."""
    args = ["fit", "--config", str(ROOT / "tests/sweep_fixtures/tiny.yaml"), "--trainer.max_steps", "1"]
    quiet = subprocess.run([sys.executable, "-m", "mma.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if any(noise in line for noise in NOISE)], quiet.stderr
    assert "parameters (trainable / total): LLM " in quiet.stderr  # the trimmed summary, not Lightning's table
    assert "Name" not in quiet.stdout + quiet.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    verbose = subprocess.run(
        [sys.executable, "-m", "mma.cli", *args, "--verbose"], capture_output=True, text=True, cwd=tmp_path
    )
    assert verbose.returncode == 0 and "Seed set to 0" in verbose.stderr and "GPU available" in verbose.stderr
