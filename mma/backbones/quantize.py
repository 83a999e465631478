"""Load a LLaMA-family checkpoint straight into 4-bit NF4, one tensor at a time.

transformers' 4-bit load keeps every shard mapped while it loads, so a 1B model peaks near its full-precision
size. Here the model is built on the meta device, each decoder linear becomes a ``bitsandbytes`` ``Linear4bit``,
and every weight is read from the safetensors file with plain reads (no memory map), quantized at once and its
full-precision copy freed: the peak stays near the 4-bit model plus one tensor. The packed weights are the ones
transformers' own 4-bit load produces (tested).
"""

import json
import math
from pathlib import Path

import torch
from bitsandbytes.nn import Linear4bit, Params4bit
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mma.backbones.files import read_safetensors_header
from mma.errors import BackboneError

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_nf4(folder: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model in ``folder`` with decoder linears in NF4 (double quantization, compute in ``dtype``) and
    everything else (embeddings, norms, head, rotary tables) in ``dtype``."""
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in model.model.layers:
        _quantizable_linears_to_4bit(layer, dtype)
    with torch.device(device):  # rotary tables are computed, not stored: build them for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    files = _weight_files(folder)
    headers = {path: read_safetensors_header(path) for path in files}
    # Two buffers reused for every tensor: reading and converting allocate nothing that outlives a tensor, so the
    # allocator never fragments and the peak is the model plus the largest tensor twice.
    largest = max(math.prod(i["shape"]) for h in headers.values() for n, i in h.items() if n != "__metadata__")
    read_buffer = torch.empty(largest * 4, dtype=torch.uint8)
    staging = torch.empty(largest, dtype=dtype)
    for path in files:
        for name, tensor in _read_tensors(path, headers[path], read_buffer):
            _assign(model, name, tensor, staging, device)
    if config.tie_word_embeddings:
        model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise BackboneError(f"{folder}: the checkpoint lacks {len(left)} weights of the model, e.g. {left[:3]}")
    return model


def _quantizable_linears_to_4bit(block: nn.Module, dtype: torch.dtype) -> dict[str, nn.Linear]:
    """Replace every ``nn.Linear`` in ``block`` by an empty (meta) ``Linear4bit``; return the replaced linears."""
    replaced = {}
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            quantized = Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            setattr(block.get_submodule(parent), child, quantized)
            replaced[name] = module
    return replaced


def quantize_in_place(model: PreTrainedModel, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
    """NF4 for the decoder linears of a model already in memory (e.g. a GGUF file transformers dequantized).

    The same quantization as ``load_nf4``: what a small model loaded this way holds equals what ``load_nf4`` makes
    of the same weights saved to a folder.
    """
    for index, layer in enumerate(model.model.layers):
        for name, linear in _quantizable_linears_to_4bit(layer, dtype).items():
            staging = torch.empty(linear.weight.numel(), dtype=dtype)
            _assign(model, f"model.layers.{index}.{name}.weight", linear.weight.detach(), staging, device)
            if linear.bias is not None:
                quantized = layer.get_submodule(name)
                quantized.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=dtype), requires_grad=False)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


def _read_tensors(path: Path, header: dict, buffer: torch.Tensor):
    """(name, tensor) pairs of a safetensors file, each read with plain reads into ``buffer`` (no memory map).

    Each tensor is a view of ``buffer``, valid until the next one is read.
    """
    with path.open("rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")  # tensor data follows the length and the JSON header
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise BackboneError(f"{path}: tensor {name} has dtype {info['dtype']}, expected F32, BF16 or F16")
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            raw = buffer[: end - begin]
            f.readinto(memoryview(raw.numpy()))
            yield name, raw.view(_DTYPES[info["dtype"]]).view(info["shape"])


def _assign(model: PreTrainedModel, name: str, tensor: torch.Tensor, staging: torch.Tensor, device) -> None:
    """Quantize a decoder linear's weight through ``staging``; copy anything else into a tensor of its own."""
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return  # a tensor the model does not use (e.g. a rotary table saved by an old export)
    if isinstance(module, Linear4bit) and attribute == "weight":
        converted = staging[: tensor.numel()].view(tensor.shape)
        converted.copy_(tensor)
        weight = Params4bit(converted, requires_grad=False, compress_statistics=True, quant_type="nf4", module=module)
        module.weight = weight.to(device)  # quantizes: the parameter now owns only its packed 4-bit data
    else:
        owned = tensor.to(device=device, dtype=staging.dtype, copy=True)  # tensor is a view of the read buffer
        setattr(module, attribute, nn.Parameter(owned, requires_grad=False))


def keep_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    A ``Linear4bit`` in eval mode that sees an input without grad (validation, generation, any ``no_grad`` pass)
    rewrites its packed weight, in place, into that kernel's layout and uses the kernel from then on. The kernel has
    no backward: every later training step would silently drop the gradient through each 4-bit layer (torch warns
    "gemv_4bit: an autograd kernel was not registered"), and the frozen weights would have changed bytes. mma's
    backbones are always in eval mode, so the repacking is turned off for the model's 4-bit layers.
    """
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
