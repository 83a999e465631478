"""The adapter protocols, the registry of methods and the one function that decides what trains.

An adapter is any module that names its own trainable parameters (``AdapterModule``); trainability is found by
walking the module tree, never by matching parameter names (after torchtune's ``AdapterModule``). A wrapper
installed in place of a backbone module says which module it wraps (``WrapsModule``), so fingerprints, merges and
train mode can see through it; a module that learns from one data source of joint training says which
(``SourceBound``). peft's layers are seen through the same three views, in this file only.

A method is one record (``AdapterMethod``): its name, its typed settings (a dataclass subclassing
``AdapterSettings``, which the CLI validates when the recipe is parsed), its ``attach`` and, where it can be folded
into the LLM's weights, its ``fold``; all registered from the method's own file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import Parameter

from mma.errors import ConfigError
from mma.layout import SequenceLayout

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mma.model import VisionLanguageModel


@runtime_checkable
class AdapterModule(Protocol):
    """A module whose parameters listed by ``adapter_params`` (names relative to it) are trained."""

    def adapter_params(self) -> list[str]: ...


@runtime_checkable
class WrapsModule(Protocol):
    """A module installed in place of a backbone module, which it keeps as a child and runs unchanged."""

    def wrapped_module(self) -> nn.Module: ...


@runtime_checkable
class SourceBound(Protocol):
    """A module whose declared parameters learn only from batches of one data source (joint training); ``None``
    learns from every batch."""

    train_source: str | None


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
# the adapter modules bound to that source, plus those of modules bound to none.
CAPTION, INSTRUCTION = "caption", "instruction"
# Keyword arguments that carry the visual tokens (B, n_vis, d) and the has-image flags (B,) through the LLM's
# forward to its decoder layers, where adapters read them (early-fusion attention, MemVP's FFN memory; see
# ``mma.model``).
VISUAL_TOKENS, HAS_IMAGE = "mma_visual_tokens", "mma_has_image"


class AdapterSettings:
    """Base of every method's settings. A subclass is a dataclass whose docstring documents each field (the CLI's
    ``--help`` shows it); its ``validate`` checks ranges when the settings are made, so a recipe with a bad value
    fails when parsed, before any weight loads."""

    name: ClassVar[str] = ""
    # Why a method without a fold cannot be merged, for ``mma merge``'s refusal ("" says nothing more).
    merge_refusal: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first setting out of range."""

    def layout(self) -> SequenceLayout:
        """The sequence layout this method needs (LaVIN's, without a modality token, unless overridden)."""
        return SequenceLayout()

    def projector_source(self) -> str | None:
        """The data source the projector learns from in joint training (None: every batch)."""
        return None

    def check(self, field: str, ok: bool, rule: str) -> None:
        """One range rule: ``ConfigError`` ``adapter 'lavin': hidden=0 must be at least 1`` when not ``ok``."""
        if not ok:
            raise ConfigError(f"adapter {self.name!r}: {field}={getattr(self, field)!r} {rule}")


Attach = Callable[["VisionLanguageModel", Any], None]
# fold(model, modality) -> the model's LLM with the adapter folded in; modality is "text", "image" or None.
Fold = Callable[["VisionLanguageModel", str | None], "PreTrainedModel"]


@dataclass
class AdapterMethod:
    """A registered method: its name, settings class, ``attach(model, settings)`` and optional merge ``fold``."""

    name: str
    settings: type[AdapterSettings]
    attach: Attach
    fold: Fold | None = None


_REGISTRY: dict[str, AdapterMethod] = {}


def register_adapter(settings: type[AdapterSettings]) -> Callable[[Attach], Attach]:
    """Decorator: ``@register_adapter(LaVIN)`` on ``attach(model, settings) -> None``; the name is
    ``settings.name``."""

    def decorator(attach: Attach) -> Attach:
        if settings.name in _REGISTRY or not settings.name:
            raise ValueError(f"adapter {settings.name!r} is unnamed or registered twice")
        _REGISTRY[settings.name] = AdapterMethod(settings.name, settings, attach)
        return attach

    return decorator


def register_fold(settings: type[AdapterSettings]) -> Callable[[Fold], Fold]:
    """Decorator: the merge fold of the method whose settings class is ``settings`` (registered first)."""

    def decorator(fold: Fold) -> Fold:
        get_adapter(settings.name).fold = fold
        return fold

    return decorator


def get_adapter(name: str) -> AdapterMethod:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown adapter {name!r}; registered adapters: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_of(settings: AdapterSettings) -> AdapterMethod:
    """The registered method whose settings class ``settings`` is."""
    return get_adapter(type(settings).name)


def registered_adapters() -> list[str]:
    return sorted(_REGISTRY)


def settings_spec(settings: AdapterSettings) -> dict:
    """``{"class_path", "init_args"}``: the settings as recipes, checkpoints and exported adapters write them."""
    cls = type(settings)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dataclasses.asdict(settings)}


def settings_from_spec(spec: dict | AdapterSettings) -> AdapterSettings:
    """Typed settings from ``settings_spec`` output (or, as adapters of format 1 wrote them, ``{"adapter": name,
    "adapter_config": {...}}``); unknown methods and keys are named."""
    if isinstance(spec, AdapterSettings):
        return spec
    if "class_path" in spec:
        short = spec["class_path"].rpartition(".")[2]
        matches = [m for m in _REGISTRY.values() if m.settings.__qualname__ == short]
        if not matches:
            raise ConfigError(f"unknown adapter settings class {spec['class_path']!r}")
        cls, options = matches[0].settings, spec.get("init_args") or {}
    else:
        cls, options = get_adapter(spec["adapter"]).settings, spec.get("adapter_config") or {}
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(options) - known):
        raise ConfigError(f"adapter {cls.name!r} has no setting(s) {unknown}; known: {sorted(known)}")
    return cls(**options)


# peft's layers, seen through mma's protocols: this is the one place that knows them.


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


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The backbone module that ``module`` wraps, if it is a wrapper (mma's or peft's)."""
    if isinstance(module, WrapsModule):
        return module.wrapped_module()
    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    return None


def wrapped_child_name(module: nn.Module) -> str | None:
    """The attribute under which a wrapper keeps the module it wraps (``norm``, ``base_layer``, ...)."""
    inner = wrapped_module(module)
    return next((name for name, child in module.named_children() if child is inner), None)


def train_source(module: nn.Module) -> str | None:
    return module.train_source if isinstance(module, SourceBound) else None


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
    bound to ``source`` or to no source."""
    params = []
    for module in model.modules():
        if train_source(module) in (None, source):
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


def adapter_owned_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that belongs to an adapter: adapter modules and wrappers with their children, minus the
    backbone modules they wrap (which may hold adapters of their own, found again below them)."""
    owned: list[nn.Module] = []

    def visit(module: nn.Module, inherited: bool) -> None:
        inner = wrapped_module(module)
        own = inherited or inner is not None or bool(declared_adapter_params(module))
        if own:
            owned.append(module)
        for child in module.children():
            visit(child, own and child is not inner)

    visit(model, False)
    return owned


def set_train_mode(model: nn.Module, mode: bool = True) -> None:
    """Adapter-owned modules follow ``mode``; every backbone module stays in eval, so its dropout never fires."""
    for module in model.modules():
        module.training = False
    if mode:
        for module in adapter_owned_modules(model):
            module.training = True
