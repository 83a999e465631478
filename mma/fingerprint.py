"""Fingerprints of frozen backbones, so an adapter refuses to meet backbones other than those it was trained on.

A fingerprint hashes what the adapter depends on: the backbone's parameter names, shapes and dtypes
(``structure``) and their bytes (``values``), as the bare backbone has them: adapter parameters are left out and
adapter wrappers are seen through, so an adapted model and the untouched backbone give the same fingerprint.
The tokenizer is fingerprinted by its vocabulary and special tokens. An adapter records its backbones' names,
architectures and fingerprints at export and checks them when loaded.
"""

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mma.adapters import adapter_parameter_names
from mma.adapters.base import wrapped_child_name
from mma.backbones import LLMSpec, ViTSpec
from mma.build import ModelConfig
from mma.errors import BackboneMismatch
from mma.model import VisionLanguageModel

log = logging.getLogger(__name__)

_OVERRIDE_HINT = (
    "to load it anyway pass ignore_fingerprint=True (CLI: --ignore-fingerprint, or --model.adapter.ignore_fingerprint "
    "true for fit/test/predict)"
)


def backbone_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen parameters of ``module`` under the names the unadapted backbone gives them, sorted by name."""
    trainable = adapter_parameter_names(module)
    wrapped = {name: child for name, m in module.named_modules() if (child := wrapped_child_name(m))}
    bare = {}
    for name, param in module.named_parameters():
        if name not in trainable:
            bare[_unwrapped_name(name, wrapped)] = param
    return dict(sorted(bare.items()))


def _unwrapped_name(name: str, wrapped: dict[str, str]) -> str:
    """``layers.0.input_layernorm.norm.weight`` -> ``layers.0.input_layernorm.weight`` where that norm is wrapped
    (likewise ``q_proj.base_layer.weight`` -> ``q_proj.weight`` under peft)."""
    parts = name.split(".")
    kept = [part for i, part in enumerate(parts) if wrapped.get(".".join(parts[:i])) != part]
    return ".".join(kept)


def parameters_fingerprint(module: nn.Module) -> dict:
    """``{"structure": sha256, "values": sha256, "parameters": count}`` of the frozen backbone ``module``.

    Hashes every byte (about a second for a 135M model), so two checkpoints that differ anywhere differ here.
    """
    structure, values, count = hashlib.sha256(), hashlib.sha256(), 0
    for name, param in backbone_parameters(module).items():
        structure.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        values.update(param.detach().reshape(-1).cpu().view(torch.uint8).numpy().data)
        count += param.numel()
    return {"structure": structure.hexdigest(), "values": values.hexdigest(), "parameters": count}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict:
    """``{"vocabulary": sha256, "size": n}`` over every token, its id and the special tokens."""
    special = {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    content = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "special": special})
    return {"vocabulary": hashlib.sha256(content.encode()).hexdigest(), "size": len(tokenizer)}


def backbone_identity(model: VisionLanguageModel, config: ModelConfig) -> dict:
    """Names as given, architectures and fingerprints of the LLM, the ViT and the tokenizer."""
    vit_architecture = model.tower.architecture()
    if config.vit.path is None:
        vit_architecture = {"timm_name": config.vit.name, **vit_architecture}
    return {
        "llm": {
            "name": describe_llm(config.llm),
            "architecture": json.loads(model.llm.config.to_json_string(use_diff=False)),
            "fingerprint": parameters_fingerprint(model.llm),
        },
        "vit": {
            "name": describe_vit(config.vit),
            "architecture": vit_architecture,
            "fingerprint": parameters_fingerprint(model.vit),
        },
        "tokenizer": {"name": describe_llm(config.llm), "fingerprint": tokenizer_fingerprint(model.tokenizer)},
    }


def describe_llm(spec: LLMSpec) -> str:
    if spec.path is not None:
        return f"{spec.path} ({spec.dtype})"
    return f"random-weight {spec.shape or 'custom'} LLM (seed {spec.seed}, {spec.dtype})"


def describe_vit(spec: ViTSpec) -> str:
    if spec.path is not None:
        return f"{spec.path} ({spec.image_size or 'native'} px, {spec.dtype})"
    weights = f"weights {spec.weights}" if spec.weights else f"random weights, seed {spec.seed}"
    return f"{spec.name} ({weights}, {spec.dtype})"


def check_backbones(
    saved: dict, model: VisionLanguageModel, config: ModelConfig | None, folder: Path, ignore_fingerprint: bool
) -> None:
    """Compare the backbones' fingerprints with those recorded at export; a mismatch names both backbones."""
    current = {
        "llm": parameters_fingerprint(model.llm),
        "vit": parameters_fingerprint(model.vit),
        "tokenizer": tokenizer_fingerprint(model.tokenizer),
    }
    names = _current_names(model, config)
    problems = []
    for part, fingerprint in current.items():
        recorded = saved["backbones"][part]
        if recorded["fingerprint"] != fingerprint:
            problems.append(
                f"{part}: trained on {recorded['name']!r} ({_short(recorded['fingerprint'])}), this model has "
                f"{names[part]!r} ({_short(fingerprint)}): {_difference(recorded['fingerprint'], fingerprint)}"
            )
    if problems and not ignore_fingerprint:
        raise BackboneMismatch(
            f"adapter {folder} belongs to other backbones: {'; '.join(problems)}. An adapter on other backbones "
            f"computes nonsense; {_OVERRIDE_HINT}"
        )
    for problem in problems:
        log.warning("adapter %s loaded onto other backbones (fingerprint check overridden): %s", folder, problem)


def _current_names(model: VisionLanguageModel, config: ModelConfig | None) -> dict[str, str]:
    if config is not None:
        return {"llm": describe_llm(config.llm), "vit": describe_vit(config.vit), "tokenizer": describe_llm(config.llm)}
    llm = model.llm.name_or_path or type(model.llm).__name__
    return {"llm": llm, "vit": model.tower.name, "tokenizer": llm}


def _short(fingerprint: dict) -> str:
    return ", ".join(f"{key} {value[:12]}" for key, value in fingerprint.items() if isinstance(value, str))


def _difference(recorded: dict, current: dict) -> str:
    if "vocabulary" in recorded:
        return "a different vocabulary"
    if recorded["structure"] != current["structure"]:
        return "a different architecture or dtype"
    return "the same architecture with different weights"
