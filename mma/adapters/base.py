"""The adapter protocol, the registry and the one function that decides what trains.

An adapter is any module that names its own trainable parameters (``adapter_params``); trainability is found by
walking the module tree, never by matching parameter names (after torchtune's ``AdapterModule``). A method
registers a typed config and an attach function that wraps submodules of frozen backbones.
"""

import dataclasses
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import yaml
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import Parameter

from mma.errors import ConfigError


@runtime_checkable
class AdapterModule(Protocol):
    """A module whose parameters listed by ``adapter_params`` (names relative to it) are trained."""

    def adapter_params(self) -> list[str]: ...


@runtime_checkable
class GenerationCache(Protocol):
    """A module that memoises per-sequence work during one ``generate`` call (routing, prompt keys/values)."""

    def start_generation(self) -> None: ...

    def end_generation(self) -> None: ...


@contextmanager
def generation_caches(model: nn.Module) -> Iterator[None]:
    """Every ``GenerationCache`` in ``model`` caches from its first call (the prefill) until the block exits."""
    modules = [m for m in model.modules() if isinstance(m, GenerationCache)]
    for module in modules:
        module.start_generation()
    try:
        yield
    finally:
        for module in modules:
            module.end_generation()


# Data sources of joint training (LLaMA-Adapter V2): a batch labelled with a source updates only the parameters of
# the adapter modules whose ``train_source`` is that source, plus those of modules that name no source.
CAPTION, INSTRUCTION = "caption", "instruction"
# Keyword arguments that carry the visual tokens (B, n_vis, d) and the has-image flags (B,) through the LLM's
# forward to the attention modules of early-fusion adapters (see ``mma.model``).
VISUAL_TOKENS, HAS_IMAGE = "mma_visual_tokens", "mma_has_image"


@dataclass(frozen=True)
class AdapterMethod:
    """A registered method: its name, its config dataclass and ``attach(model, config)``."""

    name: str
    config_cls: type
    attach: Callable[[Any, Any], None]

    def make_config(self, options: dict | None = None) -> Any:
        """Typed config from a plain dict; an unknown key or a value of the wrong type is an error naming it.

        Numbers and booleans given as text (``--model.model.adapter_config.temperature 5`` arrives as ``"5"``)
        are read as YAML scalars first.
        """
        options = dict(options or {})
        fields = {f.name: f.type for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ConfigError(f"adapter {self.name!r} has no setting(s) {unknown}; known: {sorted(fields)}")
        for name, value in options.items():
            options[name] = _typed(self.name, name, value, fields[name])
        return self.config_cls(**options)


def _typed(adapter: str, name: str, value: Any, kind: Any) -> Any:
    """``value`` as a ``kind`` scalar (bool, int, float, str, or one of them or None); other kinds pass through
    unchecked."""
    options = typing.get_args(kind)
    if len(options) == 2 and type(None) in options:
        if value is None or (isinstance(value, str) and yaml.safe_load(value) is None):
            return None
        kind = next(option for option in options if option is not type(None))
    if kind not in (bool, int, float, str):
        return value
    if isinstance(value, str) and kind is not str:
        value = yaml.safe_load(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"adapter {adapter!r} setting {name!r} must be {kind.__name__}, got {value!r}")
    return value


_REGISTRY: dict[str, AdapterMethod] = {}


def register_adapter(name: str, config_cls: type) -> Callable:
    """Decorator: ``@register_adapter("lavin", MMAConfig)`` on ``attach(model, config) -> None``."""

    def decorator(attach: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        if name in _REGISTRY:
            raise ValueError(f"adapter {name!r} is registered twice")
        _REGISTRY[name] = AdapterMethod(name, config_cls, attach)
        return attach

    return decorator


def get_adapter(name: str) -> AdapterMethod:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown adapter {name!r}; registered adapters: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_adapters() -> list[str]:
    return sorted(_REGISTRY)


def declared_adapter_params(module: nn.Module) -> list[str]:
    """Parameter names (relative to ``module``) that ``module`` itself declares trainable.

    mma's adapters implement ``AdapterModule``; peft's layers name their adapter submodules in
    ``adapter_layer_names`` (``lora_A``, ``lora_B``, ...), which is read instead of matching parameter names.
    """
    if isinstance(module, AdapterModule):
        return module.adapter_params()
    if isinstance(module, BaseTunerLayer):
        return [
            f"{layer}.{name}"
            for layer in module.adapter_layer_names
            for name, _ in getattr(module, layer).named_parameters()
        ]
    return []


def adapter_part(module: nn.Module) -> str:
    """What kind of trainable part a module is, for parameter tables: its class's ``part`` (``"prompts"``,
    ``"gates"``, ...), ``"LoRA"`` for peft's layers, else the class name."""
    if isinstance(module, BaseTunerLayer):
        return "LoRA"
    return getattr(module, "part", type(module).__name__)


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Full names of every parameter that some adapter module in ``model`` declares trainable."""
    names = set()
    for prefix, module in model.named_modules():
        names.update(f"{prefix}.{name}" if prefix else name for name in declared_adapter_params(module))
    return names


def source_parameters(model: nn.Module, source: str) -> list[Parameter]:
    """Trainable parameters that a batch from ``source`` updates: the declared parameters of every adapter module
    whose ``train_source`` attribute is ``source`` or absent."""
    params = []
    for module in model.modules():
        if getattr(module, "train_source", None) in (None, source):
            params.extend(module.get_parameter(name) for name in declared_adapter_params(module))
    return [p for p in params if p.requires_grad]


def set_trainable_params(model: nn.Module) -> int:
    """Freeze everything, then unfreeze exactly the adapter parameters. Returns the trainable count.

    The single place in mma that touches ``requires_grad``.
    """
    trainable = adapter_parameter_names(model)
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        count += param.numel() if name in trainable else 0
    return count


def set_train_mode(model: nn.Module, mode: bool = True) -> None:
    """Adapters follow ``mode``; frozen backbone modules stay in eval so their dropout never fires."""
    for module in model.modules():
        module.training = False
    if mode:
        for module in model.modules():
            if declared_adapter_params(module):
                nn.Module.train(module, True)
