"""Sweep files: a base recipe and the overrides that turn it into runs, every run checked before any starts.

A run is the recipe parsed by the ``mma`` command's own LightningCLI parser with the run's overrides as its dotted
command-line options, so a sweep accepts exactly what ``mma fit`` accepts and rejects the rest by name.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mma.errors import ConfigError, MMAError

MODES = ("train", "params")


@dataclass
class SweepSpec:
    """A sweep file, ``experiments/<name>/sweep.yaml``. Keys below are dotted recipe keys (``trainer.max_steps``),
    each set to its value as a whole (a mapping replaces the recipe's mapping); ``recipe`` picks the base recipe.

    Args:
        recipe: base recipe, relative to the working directory; a run or grid may set another with ``recipe``.
        mode: ``train`` fits, tests and exports every run; ``params`` only counts parameters on the meta device.
        overrides: keys set in every run.
        runs: named runs, each ``{name: ..., <key>: value, ...}``; without any, one run named ``base``.
        grid: key -> list of values; every run is crossed with every combination.
        baseline: name of the run whose training step time ``step_time_ratio`` divides by (and, with seeds, the
            run the others are compared with).
        metrics: the accuracies ``results.md`` shows for trained runs (``results.csv`` has every metric); the
            default suits the synthetic task, e.g. ``[test/shape, test/colour, test/yes/no, test/all]`` easy-vqa.
        plot_metrics: metrics drawn against trainable parameters and against step time.
        seeds: repeat every run once per seed, named ``<run> seed=N``, with ``seed_everything: N`` and
            ``model.model.seed: N``: the adapters' and projector's initialisation and dropout change, the data does
            not (its own ``seed`` stays the recipe's: on the synthetic task it draws the problems, test set
            included, so it would mix test-set sampling into the spread). ``results.md`` then shows each run's
            mean, standard deviation and n.
    """

    recipe: str | None = None
    mode: str = "train"
    overrides: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    baseline: str | None = None
    metrics: list[str] = field(default_factory=lambda: ["test/image", "test/text", "test/all", "blind/image"])
    plot_metrics: list[str] = field(default_factory=lambda: ["test/all"])
    seeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Point:
    """One run of a sweep before it is checked: its name, base recipe and overrides in the order they apply;
    ``group`` is the name without the seed, ``seed`` the sweep's seed (None: the sweep has no ``seeds``)."""

    name: str
    recipe: str
    settings: dict[str, Any]
    group: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class Run:
    """A checked run: ``args`` reproduce it with ``mma fit --config RECIPE ARGS``; ``key`` names its folder;
    ``group`` and ``seed`` as the ``Point``'s."""

    name: str
    recipe: str
    args: list[str]
    config: dict
    key: str
    group: str = ""
    seed: int | None = None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep file (OmegaConf interpolation allowed); an unknown top-level key or mode is named."""
    if not Path(path).is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as err:
        raise ConfigError(f"sweep {path} is not a readable YAML file ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep {path} is not a mapping")
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"sweep {path} has unknown key(s) {unknown}; known: {sorted(known)}")
    spec = SweepSpec(**raw)
    if spec.mode not in MODES:
        raise ConfigError(f"sweep {path}: mode {spec.mode!r} is not one of {MODES}")
    if not all(isinstance(values, list) and values for values in spec.grid.values()):
        raise ConfigError(f"sweep {path}: every grid key needs a non-empty list of values")
    for key in ("metrics", "plot_metrics"):
        names = getattr(spec, key)
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ConfigError(f"sweep {path}: {key} must be a list of metric names, got {names!r}")
    seeds = spec.seeds
    if not isinstance(seeds, list) or not all(type(s) is int for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"sweep {path}: seeds must be a list of distinct integers, got {seeds!r}")
    return spec


def _label(value: Any) -> str:
    """Short text of a grid value for a run name (a recipe path shows as its file stem)."""
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        return Path(value).stem
    return value if isinstance(value, str) else json.dumps(value)


def expand(spec: SweepSpec) -> list[Point]:
    """Every run crossed with every grid combination, named ``run key=value ...``; names must be unique."""
    runs = spec.runs or [{"name": "base"}]
    if any("name" not in run for run in runs):
        raise ConfigError("every entry of 'runs' needs a 'name'")
    combos = [dict(zip(spec.grid, values, strict=True)) for values in itertools.product(*spec.grid.values())]
    points = []
    for run, combo in itertools.product(runs, combos):
        settings = {**spec.overrides, **{k: v for k, v in run.items() if k != "name"}, **combo}
        name = " ".join([run["name"], *(f"{key.rsplit('.', 1)[-1]}={_label(v)}" for key, v in combo.items())])
        recipe = settings.pop("recipe", spec.recipe)
        if recipe is None:
            raise ConfigError(f"run {name!r} has no recipe: set 'recipe' at the top or in the run")
        points.extend(seeded(Point(name, str(recipe), settings, name), spec.seeds))
    names = [p.name for p in points]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"run names repeat: {duplicates}")
    return points


def seeded(point: Point, seeds: list[int]) -> list[Point]:
    """``point`` once per seed, named ``<name> seed=N`` with ``seed_everything: N``; itself without seeds."""
    if not seeds:
        return [point]
    if "seed_everything" in point.settings:
        raise ConfigError(f"run {point.name!r} sets seed_everything, which the sweep's seeds set")
    return [
        Point(
            f"{point.name} seed={seed}",
            point.recipe,
            {**point.settings, "seed_everything": seed, "model.model.seed": seed},
            point.name,
            seed,
        )
        for seed in seeds
    ]


def cli_value(value: Any) -> str:
    """A value as the CLI parser reads it: strings as they are, everything else as JSON (YAML flow)."""
    return value if isinstance(value, str) else json.dumps(value)


def parse(recipe: str, args: list[str]):
    """``mma.recipe.config_cli`` with its instantiation errors turned into one ``ConfigError`` line (parse errors
    already are one)."""
    from mma.recipe import config_cli

    try:
        return config_cli(recipe, args)
    except (MMAError, MisconfigurationException, ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def resolve(point: Point) -> Run:
    """Parse ``point`` like ``mma fit`` would (adapter settings typed and range-checked by the parser); errors name
    the run and the key."""
    args = [f"--{key}={cli_value(value)}" for key, value in point.settings.items()]
    try:
        cli = parse(point.recipe, args)
    except ConfigError as err:
        raise ConfigError(f"run {point.name!r}: {err}") from None
    if cli.trainer.world_size > 1:
        raise ConfigError(
            f"run {point.name!r}: a sweep runs its runs in one process; run multi-process strategies with mma fit"
        )
    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    return Run(point.name, point.recipe, args, config, config_key(config), point.group or point.name, point.seed)


def config_key(config: dict) -> str:
    """12 hex digits of the SHA-256 of the resolved config: the run's identity and folder name."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines off: every parse builds a Trainer, which logs its devices and seed."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def resolve_all(spec: SweepSpec) -> list[Run]:
    """Every run of the sweep, checked; the first bad key stops the sweep before any run starts."""
    with quiet_lightning():
        runs = [resolve(point) for point in expand(spec)]
    keys = [run.key for run in runs]
    if same := sorted({run.name for run in runs if keys.count(run.key) > 1}):
        raise ConfigError(f"runs {same} resolve to the same config")
    if spec.baseline is not None and spec.baseline not in {run.group for run in runs}:
        raise ConfigError(f"baseline {spec.baseline!r} is not the name of a run")
    return runs
