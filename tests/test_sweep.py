"""``mma sweep``: runs are checked before any starts, an interrupted sweep resumes without repeating finished runs,
and the results hold every run."""

import csv
from pathlib import Path

import pytest
import yaml
from conftest import TINY_LLM, TINY_VIT, tiny_config

import mma.sweep.runs
from mma.build import build_model
from mma.checkpoint import load_adapter
from mma.cli import main
from mma.errors import ConfigError
from mma.parameters import count_parameters
from mma.recipe import config_cli
from mma.sweep import load_sweep, resolve_all, write_report
from mma.sweep.spec import SweepSpec, expand

TINY = str(Path(__file__).parent / "sweep_fixtures" / "tiny.yaml")


def _sweep(folder: Path, **spec) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"recipe": TINY, **spec}, sort_keys=False))
    return path


def _rows(folder: Path) -> list[dict]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_tiny_recipe_builds_the_conftest_model():
    config = config_cli(TINY).model.model_config
    assert config.llm.config == TINY_LLM and config.vit.overrides == TINY_VIT
    assert config.visual == tiny_config().visual


def test_runs_are_crossed_with_the_grid_and_named_by_it():
    spec = SweepSpec(recipe=TINY, runs=[{"name": "a"}, {"name": "b", "x.y": 1}], grid={"m.temperature": [1, 5]})
    points = expand(spec)
    assert [p.name for p in points] == ["a temperature=1", "a temperature=5", "b temperature=1", "b temperature=5"]
    assert points[3].settings == {"x.y": 1, "m.temperature": 5}


class _Interrupted(Exception):
    pass


def test_interrupted_sweep_resumes_without_repeating_finished_runs(tmp_path, monkeypatch):
    path = _sweep(
        tmp_path,
        overrides={"trainer.max_steps": 2},
        runs=[{"name": "first"}, {"name": "second", "model.model.adapter.temperature": 5}],
        baseline="first",
        plot_metrics=["test/image", "test/text"],
    )
    real_train, trained = mma.sweep.runs.train, []

    def interrupted_second(run, folder):
        trained.append(run.name)
        if run.name == "second":
            raise _Interrupted  # as if killed mid-run: its folder and config exist, no metrics, no marker
        return real_train(run, folder)

    monkeypatch.setattr(mma.sweep.runs, "train", interrupted_second)
    with pytest.raises(_Interrupted):
        main(["sweep", str(path)])
    first, second = (tmp_path / "runs" / run.key for run in resolve_all(load_sweep(path)))
    assert (first / "done").is_file() and (second / "config.yaml").is_file() and not (second / "done").exists()
    finished_at = (first / "metrics.json").stat().st_mtime_ns

    def counted(run, folder):
        trained.append(run.name)
        return real_train(run, folder)

    monkeypatch.setattr(mma.sweep.runs, "train", counted)
    main(["sweep", str(path)])
    assert trained == ["first", "second", "second"]
    assert (first / "metrics.json").stat().st_mtime_ns == finished_at
    rows = _rows(tmp_path)
    assert [row["name"] for row in rows] == ["first", "second"]
    assert float(rows[0]["step_time_ratio"]) == 1.0 and float(rows[1]["step_time_s"]) > 0
    table = (tmp_path / "results.md").read_text()
    assert "| first |" in table and "| second |" in table
    for plot in ("accuracy_vs_params.png", "accuracy_vs_step_time.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = build_model(tiny_config(temperature=5.0, dropout=0.0))
    load_adapter(model, second / "adapter", tiny_config(temperature=5.0, dropout=0.0))
    assert (
        yaml.safe_load((second / "config.yaml").read_text())["model"]["model"]["adapter"]["init_args"]["temperature"]
        == 5
    )


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("model.model.adaptr", "lora", "model.model.adaptr"),
        ("trainer.max_steps", "many", "trainer.max_steps"),
        ("model.model.adapter.temperature", "hot", "temperature"),
        ("model.model.adapter.temprature", 5, "temprature"),
        ("model.model.adapter.hidden", 0, "hidden=0 must be at least 1"),
    ],
)
def test_bad_override_fails_before_the_first_run_naming_the_key(tmp_path, capsys, key, value, named):
    path = _sweep(tmp_path, runs=[{"name": "good"}, {"name": "bad", key: value}])
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("mma: error: run 'bad': ") and named in error, error
    assert not (tmp_path / "runs").exists()


def test_multi_process_strategies_are_refused(tmp_path):
    path = _sweep(tmp_path, overrides={"trainer.strategy": "ddp", "trainer.devices": 2})
    with pytest.raises(ConfigError, match="run multi-process strategies with mma fit"):
        resolve_all(load_sweep(path))


def test_runs_are_identified_by_their_resolved_config(tmp_path):
    """Spelling out a default gives the same config, hence the same run."""
    path = _sweep(tmp_path, runs=[{"name": "plain"}, {"name": "explicit", "model.model.adapter.hidden": 8}])
    with pytest.raises(ConfigError, match=r"runs \['explicit', 'plain'\] resolve to the same config"):
        resolve_all(load_sweep(path))


def test_params_sweep_counts_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(mma.sweep.runs, "train", None)  # a params sweep must never train
    runs = [
        {"name": "lavin"},
        {"name": "lora", "model.model.adapter": {"class_path": "LoRA", "init_args": {"rank": 4}}},
    ]
    main(["sweep", str(_sweep(tmp_path, mode="params", runs=runs))])
    rows = _rows(tmp_path)
    for row, config in zip(rows, (tiny_config(dropout=0.0), tiny_config("lora", rank=4)), strict=True):
        counts = count_parameters(build_model(config, device="meta"))
        assert int(row["trainable"]) == sum(trainable for trainable, _ in counts.values())
        assert int(row["total"]) == sum(total for _, total in counts.values())
    assert "| lora |" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.rglob("adapter")) and not list(tmp_path.glob("*.png"))


def test_seeds_repeat_every_run_and_grid_point():
    spec = SweepSpec(recipe=TINY, runs=[{"name": "a"}], grid={"m.temperature": [1, 5]}, seeds=[0, 7])
    points = expand(spec)
    assert [p.name for p in points] == [
        "a temperature=1 seed=0",
        "a temperature=1 seed=7",
        "a temperature=5 seed=0",
        "a temperature=5 seed=7",
    ]
    assert [(p.group, p.seed) for p in points[:2]] == [("a temperature=1", 0), ("a temperature=1", 7)]
    assert points[1].settings == {"m.temperature": 1, "seed_everything": 7, "model.model.seed": 7}
    with pytest.raises(ConfigError, match="run 'b' sets seed_everything, which the sweep's seeds set"):
        expand(SweepSpec(recipe=TINY, runs=[{"name": "b", "seed_everything": 3}], seeds=[0]))


@pytest.mark.parametrize("seeds", [[0, 0], ["one"], 3])
def test_seeds_must_be_distinct_integers(tmp_path, seeds):
    with pytest.raises(ConfigError, match="seeds must be a list of distinct integers"):
        load_sweep(_sweep(tmp_path, seeds=seeds))


@pytest.mark.parametrize("key", ["metrics", "plot_metrics"])
def test_metric_lists_must_name_metrics(tmp_path, key):
    with pytest.raises(ConfigError, match=f"{key} must be a list of metric names"):
        load_sweep(_sweep(tmp_path, **{key: "test/all"}))


def test_report_shows_the_sweeps_metrics_as_columns(tmp_path):
    rows = [{"name": "a", "trainable": 10, "test/shape": 0.5, "test/image": 0.25, "step_time_s": 1.0}]
    write_report(rows, SweepSpec(recipe=TINY, metrics=["test/shape", "test/yes/no"]), tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0] == "| name | trainable | shape (%) | step (s) |"
    assert "| a | 10 | 50.0 | 1 |" in table


def _seeded_rows(name: str, accuracies: list[float], step: float = 1.0) -> list[dict]:
    return [
        {"name": f"{name} seed={seed}", "run": name, "seed": seed, "trainable": 1000, "test/all": accuracy}
        | {"step_time_s": step + 0.2 * seed}
        for seed, accuracy in enumerate(accuracies)
    ]


def test_report_gives_mean_sd_and_n_and_marks_differences_within_the_spread(tmp_path):
    """82.0 ± 2.0 is the reference; +4.0 against sds 1.0 + 2.0 is outside the spread, +1.0 against 2.0 + 2.0
    inside, and one seed has no spread."""
    rows = [
        *_seeded_rows("base", [0.80, 0.82, 0.84]),
        *_seeded_rows("far", [0.85, 0.86, 0.87]),
        *_seeded_rows("near", [0.81, 0.83, 0.85]),
        *_seeded_rows("single", [0.90]),
    ]
    spec = SweepSpec(recipe=TINY, baseline="base", plot_metrics=["test/all"], seeds=[0, 1, 2])
    write_report(rows, spec, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| name | n | trainable | all (%) | step (s) | step ratio |" in table
    assert "| base | 3 | 1,000 | 82.0 ± 2.0 | 1.2 ± 0.2 | 1 ± 0.1667 |" in table
    assert "| single | 1 | 1,000 | 90.0 | 1 | 0.8333 |" in table
    assert "| far | 3 | +4.0 |" in table and "| near | 3 | +1.0 ~ |" in table and "| single | 1 | +8.0 ? |" in table
    assert "| base | 3 | reference |" in table
    assert len(_rows(tmp_path)) == 10  # results.csv keeps every seed's run
    for plot in ("accuracy_vs_params.png", "accuracy_vs_step_time.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeded_sweep_trains_each_seed_and_reports_the_spread(tmp_path):
    path = _sweep(tmp_path, overrides={"trainer.max_steps": 2}, seeds=[0, 1], plot_metrics=["test/image"])
    main(["sweep", str(path)])
    rows = _rows(tmp_path)
    assert [(row["name"], row["run"], row["seed"]) for row in rows] == [
        ("base seed=0", "base", "0"),
        ("base seed=1", "base", "1"),
    ]
    runs = resolve_all(load_sweep(path))
    assert [run.config["seed_everything"] for run in runs] == [0, 1]
    assert rows[0]["train/loss"] != rows[1]["train/loss"]  # the seed changed the projector's initialisation
    assert "| base | 2 |" in (tmp_path / "results.md").read_text()
