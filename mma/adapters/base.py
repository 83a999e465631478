"""The adapter protocol, the registry and the one function that decides what trains.

An adapter is any module that names its own trainable parameters (``adapter_params``); trainability is found by
walking the module tree, never by matching parameter names (after torchtune's ``AdapterModule``). A method
registers a typed config and an attach function that wraps submodules of frozen backbones.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import yaml
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mma.errors import ConfigError


@runtime_checkable
class AdapterModule(Protocol):
    """A module whose parameters listed by ``adapter_params`` (names relative to it) are trained."""

    def adapter_params(self) -> list[str]: ...


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
    """``value`` as a ``kind`` scalar (bool, int, float, str); other kinds pass through unchecked."""
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


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Full names of every parameter that some adapter module in ``model`` declares trainable."""
    names = set()
    for prefix, module in model.named_modules():
        names.update(f"{prefix}.{name}" if prefix else name for name in declared_adapter_params(module))
    return names


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
