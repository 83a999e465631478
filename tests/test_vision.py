"""Vision towers as users have them: a timm ViT or a Hugging Face CLIP / DINOv2 / SigLIP folder, all frozen and
unmodified, seen through one interface by the model, LaVIN's ViT adapters, LoRA, the image transform, activation
checkpointing, fingerprints and export."""

import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from conftest import TINY_LLM, TINY_VIT, collator_for, perturb, tiny_trainer
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mma.adapters import adapter_parameter_names, get_adapter
from mma.adapters.layers import AdaptedNorm
from mma.adapters.memvp import ParallelAdapter
from mma.backbones import LLMSpec, ViTSpec, load_vit, vision_tower
from mma.build import ModelConfig, build_model
from mma.checkpoint import CONFIG_FILE, adapter_weights, load_adapter, save_adapter
from mma.cli import main
from mma.data import SyntheticVQADataModule
from mma.errors import BackboneError, ConfigError
from mma.model import VisualConfig
from mma.module import MMAModule, OptimizerConfig

TINY_HF = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
HF_MODELS = {"clip": (CLIPVisionModel, CLIPVisionConfig), "dinov2": (Dinov2Model, Dinov2Config)}
HF_MODELS["siglip"] = (SiglipVisionModel, SiglipVisionConfig)
FAMILIES = ["timm", "clip", "dinov2", "siglip"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """A tiny random folder of each Hugging Face family, saved as users have them, and a full CLIP folder."""
    root = tmp_path_factory.mktemp("vision")
    found = {}
    for family, (model_class, config_class) in HF_MODELS.items():
        torch.manual_seed(0)
        model_class(config_class(**TINY_HF)).save_pretrained(root / family)
        found[family] = str(root / family)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    CLIPModel(CLIPConfig(vision_config=TINY_HF, text_config=text)).save_pretrained(root / "clip-full")
    found["clip-full"] = str(root / "clip-full")
    return found


def vit_spec(family: str, folders: dict[str, str], **fields) -> ViTSpec:
    if family == "timm":
        return ViTSpec(name="vit_tiny_patch16_224", overrides=TINY_VIT, **fields)
    return ViTSpec(path=folders[family], **fields)


def config_for(family: str, folders: dict, adapter: str = "lavin", visual: dict | None = None, **settings):
    """The tiny LLM with the ``family`` tower; SigLIP has no class token, so it gives patch tokens."""
    tokens = "patches" if family == "siglip" else "cls"
    return ModelConfig(
        llm=LLMSpec(config=TINY_LLM),
        vit=vit_spec(family, folders),
        visual=VisualConfig(**{"tokens": tokens, "every": 1, "projector_hidden": 16, **(visual or {})}),
        adapter=get_adapter(adapter).settings(**settings),
    )


def model_for(family: str, folders: dict, adapter: str = "lavin", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_model(config_for(family, folders, adapter, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_lavin_wraps_the_pre_attention_norm_of_every_block(family, folders):
    model = model_for(family, folders)
    tower = model.tower
    norms = [getattr(block, tower.pre_attention_norm_name) for block in tower.blocks]
    assert len(norms) == 2 and all(isinstance(norm, AdaptedNorm) for norm in norms)
    expected = {"timm": "norm1", "clip": "layer_norm1", "dinov2": "norm1", "siglip": "layer_norm1"}[family]
    assert tower.pre_attention_norm_name == expected
    assert [m.adapter.route_from for m in norms] == ["mean" if family == "siglip" else "first"] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family, folders, samples):
    adapted = model_for(family, folders, "lavin")
    base = model_for(family, folders, "none")
    base.layout = dataclasses.replace(base.layout, visual_in_sequence=adapted.layout.visual_in_sequence)
    base_logprobs, _ = base.token_logprobs(collator_for(base)(samples))
    adapted_logprobs, _ = adapted.token_logprobs(collator_for(adapted)(samples))
    torch.testing.assert_close(adapted_logprobs, base_logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_vit_adapters_and_no_backbone_parameter(family, folders, samples):
    model = model_for(family, folders)
    perturb(model)
    model.train()
    model.loss(collator_for(model)(samples)).backward()
    trainable = adapter_parameter_names(model)
    vit_adapters = [name for name in trainable if name.startswith("vit.")]
    assert len(vit_adapters) == 2 * 8  # per block: down, two grouped ups, router; weights and biases
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("family", FAMILIES)
def test_memvp_adapts_the_ffn_of_every_block_of_every_tower(family, folders, samples):
    """MemVP's parallel ViT adapters reach the blocks through the tower view, so timm and Hugging Face towers (and
    pooled memory grids, read from the tower's patch grid) attach alike; gradients reach them all."""
    model = model_for(family, folders, "memvp", memory_slots=16, visual=dict(tokens="patches"), memory_grids=[2])
    assert all(isinstance(block.mlp, ParallelAdapter) for block in model.tower.blocks)
    perturb(model)
    model.train()
    model.loss(collator_for(model)(samples)).backward()
    vit_adapters = [name for name in adapter_parameter_names(model) if name.startswith("vit.")]
    assert len(vit_adapters) == 2 * 2  # per block: down and up (no biases)
    for name in vit_adapters:
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def _reference(vit, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states (embeddings first) and last hidden state, straight from the Hugging Face model."""
    kwargs = {} if isinstance(vit, Dinov2Model) else {"interpolate_pos_encoding": True}
    out = vit(pixel_values=pixels, output_hidden_states=True, **kwargs)
    return list(out.hidden_states), out.last_hidden_state


@pytest.mark.parametrize("family", ["clip", "dinov2", "siglip"])
def test_features_are_the_hidden_states_hugging_face_gives(family, folders):
    vit = load_vit(vit_spec(family, folders))
    tower, pixels = vision_tower(vit), torch.randn(2, 3, 32, 32)
    hidden, last = _reference(vit, pixels)
    prefix = 0 if family == "siglip" else 1
    assert tower.num_patches() == 16 and tower.width == 32 and tower.has_class_token == bool(prefix)
    patches = tower.features(pixels, "patches", every=1, layer=-1, norm=False)
    torch.testing.assert_close(patches, last[:, prefix:], rtol=0, atol=0)  # DINOv2, SigLIP: final norm applied
    penultimate = tower.features(pixels, "patches", every=1, layer=-2, norm=False)
    torch.testing.assert_close(penultimate, hidden[-2][:, prefix:], rtol=0, atol=0)  # block 0's output, no norm
    assert penultimate.shape == (2, 16, 32) and not torch.allclose(penultimate, patches)
    if prefix:
        cls = tower.features(pixels, "cls", every=1, layer=-1, norm=False)
        torch.testing.assert_close(cls, torch.stack([hidden[1][:, 0], hidden[2][:, 0]], dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["timm", "clip", "dinov2", "siglip"])
def test_norm_applies_the_final_norm_once_to_tokens_that_lack_it(family, folders):
    """``visual.norm``: intermediate tokens go through the backbone's final norm (DINOv2's
    ``get_intermediate_layers(norm=True)``); last-layer outputs that already had it are not normed twice."""
    vit = load_vit(vit_spec(family, folders))
    tower, pixels = vision_tower(vit), torch.randn(2, 3, 32, 32)
    final_norm = {"timm": "norm", "clip": "post_layernorm", "dinov2": "layernorm", "siglip": "post_layernorm"}
    norm = vit.get_submodule(final_norm[family])
    for tokens, layer in [("patches", -2), *([("cls", -1)] if tower.has_class_token else [])]:
        raw = tower.features(pixels, tokens, every=1, layer=layer, norm=False)
        torch.testing.assert_close(tower.features(pixels, tokens, every=1, layer=layer, norm=True), norm(raw))
    last = tower.features(pixels, "patches", every=1, layer=-1, norm=False)
    expected = norm(last) if family == "clip" else last  # CLIP's last_hidden_state has no final norm
    torch.testing.assert_close(tower.features(pixels, "patches", every=1, layer=-1, norm=True), expected)


@pytest.mark.parametrize("family", ["timm", "clip", "dinov2"])
def test_with_class_puts_the_same_layers_class_token_before_the_patches(family, folders):
    """ADEM-VL's input token: the class token of the block the patches come from, normed as they are (the last
    block's output features: timm's and DINOv2's final norm applied, CLIP's not)."""
    tower, pixels = vision_tower(load_vit(vit_spec(family, folders))), torch.randn(2, 3, 32, 32)
    for layer, normed in [(-1, family != "clip"), (-2, False)]:
        patches = tower.features(pixels, "patches", every=1, layer=layer, norm=False)
        both = tower.features(pixels, "patches", every=1, layer=layer, norm=False, with_class=True)
        class_tokens = tower.features(pixels, "cls", every=1, layer=-1, norm=normed)  # (2, depth, width)
        assert both.shape == (2, 17, 32)
        torch.testing.assert_close(both[:, 1:], patches, rtol=0, atol=0)
        torch.testing.assert_close(both[:, 0], class_tokens[:, layer])


@pytest.mark.parametrize(
    ("family", "visual", "expected"),
    [
        ("timm", dict(tokens="cls", every=1), 2),
        ("timm", dict(tokens="patches", layer=-2), 16),
        ("clip", dict(tokens="cls", every=2), 1),
        ("clip", dict(tokens="patches", layer=-2), 16),  # LLaVA's penultimate-layer patches
        ("dinov2", dict(tokens="patches"), 16),
        ("siglip", dict(tokens="patches", layer=0), 16),
    ],
)
def test_visual_token_counts_and_shapes(family, visual, expected, folders):
    model = model_for(family, folders, visual=visual)
    assert model.num_visual_tokens == expected
    visual, class_token = model.encode_images(torch.randn(3, 3, 32, 32))
    assert visual.shape == (3, expected, TINY_LLM["hidden_size"]) and class_token is None


@pytest.mark.parametrize("family", ["clip", "dinov2", "siglip"])
def test_hugging_face_models_run_at_another_image_size(family, folders):
    """Position embeddings are interpolated: 48 px with patch 8 is a 6 x 6 grid."""
    config = config_for(family, folders, visual=dict(tokens="patches"))
    config.vit = dataclasses.replace(config.vit, image_size=48)
    model = build_model(config)
    assert model.tower.image_size == (48, 48) and model.num_visual_tokens == 36
    visual, _ = model.encode_images(torch.randn(1, 3, 48, 48))
    assert visual.shape == (1, 36, TINY_LLM["hidden_size"])


def test_cls_tokens_need_a_class_token_and_layers_are_checked(folders):
    with pytest.raises(ConfigError, match="needs a ViT with a class token"):
        model_for("siglip", folders, visual=dict(tokens="cls"))
    with pytest.raises(ConfigError, match="visual.layer=2 must be in -2..1"):
        model_for("clip", folders, visual=dict(tokens="patches", layer=2))
    with pytest.raises(ConfigError, match="cls uses every"):
        model_for("clip", folders, visual=dict(tokens="cls", layer=-2))


def test_a_full_clip_folder_gives_its_vision_model(folders):
    full, vision_only = CLIPModel.from_pretrained(folders["clip-full"]), load_vit(ViTSpec(path=folders["clip-full"]))
    assert isinstance(vision_only, CLIPVisionModel)
    for name, tensor in vision_only.state_dict().items():
        assert torch.equal(tensor, full.vision_model.state_dict()[name]), name


@pytest.mark.parametrize("family", ["clip", "dinov2", "siglip"])
def test_loaded_folders_are_frozen_in_eval_and_bit_exact(family, folders):
    vit = load_vit(ViTSpec(path=folders[family], dtype="bfloat16"))
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    saved = HF_MODELS[family][0].from_pretrained(folders[family])
    for name, tensor in vit.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, saved.state_dict()[name].bfloat16()), name


def test_a_dinov2_folder_without_the_unused_mask_token_loads(folders, tmp_path):
    """``mask_token`` serves masked pre-training only; any other missing tensor is refused."""
    config = Dinov2Config(**TINY_HF)
    config.save_pretrained(tmp_path)
    state = Dinov2Model.from_pretrained(folders["dinov2"]).state_dict()
    save_file({k: v for k, v in state.items() if k != "embeddings.mask_token"}, tmp_path / "model.safetensors")
    assert torch.equal(load_vit(ViTSpec(path=str(tmp_path))).embeddings.cls_token, state["embeddings.cls_token"])
    save_file({k: v for k, v in state.items() if k != "embeddings.cls_token"}, tmp_path / "model.safetensors")
    _one_line_error(ViTSpec(path=str(tmp_path)), r"missing 1 tensors \['embeddings.cls_token'\], unexpected 0")


def test_image_transform_follows_each_family_image_processor(folders):
    configs = {family: vision_tower(load_vit(vit_spec(family, folders))).data_config() for family in FAMILIES}
    assert configs["clip"]["mean"] == (0.48145466, 0.4578275, 0.40821073)
    assert configs["clip"]["std"] == (0.26862954, 0.26130258, 0.27577711)
    assert configs["dinov2"]["mean"] == (0.485, 0.456, 0.406) and configs["dinov2"]["crop_pct"] == 0.875
    assert configs["siglip"]["mean"] == (0.5, 0.5, 0.5) and configs["siglip"]["crop_mode"] == "squash"
    assert all(c["input_size"] == (3, 32, 32) and c["interpolation"] == "bicubic" for c in configs.values())
    assert configs["timm"]["mean"] == timm.data.resolve_data_config({}, model=load_vit(vit_spec("timm", {})))["mean"]


def test_two_lightning_steps_on_a_dinov2_folder_with_activation_checkpointing(folders, tmp_path):
    L.seed_everything(0, verbose=False)
    module = MMAModule(config_for("dinov2", folders), OptimizerConfig(lr=1e-2), activation_checkpointing=True)
    data = SyntheticVQADataModule(train_size=4, image_size=32, batch_size=2)
    module.configure_model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in module.model.vit.modules()) == 2
    trainer = tiny_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    trainable, after = module.trainable_state_keys(), module.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in trainable if k.startswith("model.vit."))
    assert all(torch.equal(after[k], before[k]) for k in before if k not in trainable)


def test_lora_adapts_linears_inside_the_blocks_only(folders, samples):
    """SigLIP's pooling head also has out_proj and fc1 / fc2, but it feeds no visual token."""
    model = model_for("siglip", folders, "lora", vit_target_modules=["out_proj", "fc1"])
    names = adapter_parameter_names(model)
    vit = sorted({name.split(".lora_")[0] for name in names if name.startswith("vit.")})
    assert vit == [f"vit.encoder.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.fc1", "self_attn.out_proj")]
    perturb(model)
    model.loss(collator_for(model)(samples)).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if name in names)
    with pytest.raises(ConfigError, match=r"no ViT block layer is called \['qkv'\]; its linears are \['fc1'"):
        model_for("clip", folders, "lora", vit_target_modules=["qkv"])


def test_export_round_trip_records_the_hugging_face_tower(folders, tmp_path, samples):
    model = model_for("clip", folders, visual=dict(tokens="patches", layer=-2))
    perturb(model)
    config = config_for("clip", folders, visual=dict(tokens="patches", layer=-2))
    folder = save_adapter(model, config, tmp_path / "adapter")
    saved = json.loads((folder / CONFIG_FILE).read_text())
    assert saved["backbones"]["vit"]["architecture"]["class"] == "CLIPVisionModel"
    assert saved["prompt_format"]["image_size"] == [32, 32] and saved["model"]["visual"]["layer"] == -2
    fresh = model_for("clip", folders, seed=3, visual=dict(tokens="patches", layer=-2))
    load_adapter(fresh, folder, config)
    batch = collator_for(model)(samples)
    assert all(torch.equal(adapter_weights(fresh)[k], v) for k, v in adapter_weights(model).items())
    assert torch.equal(fresh.token_logprobs(batch)[0], model.token_logprobs(batch)[0])


def _one_line_error(spec: ViTSpec, match: str) -> None:
    with pytest.raises(BackboneError, match=match) as caught:
        load_vit(spec)
    assert "\n" not in str(caught.value)


def test_bad_folders_fail_with_one_line_naming_the_folder_and_the_problem(folders, tmp_path):
    _one_line_error(ViTSpec(path=str(tmp_path / "nowhere")), "vision folder '.*nowhere' does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(ViTSpec(path=str(empty)), "'.*empty' has no config.json")
    (empty / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    _one_line_error(ViTSpec(path=str(empty)), "model_type 'resnet' is not one of")
    (empty / "config.json").write_text(json.dumps({"model_type": "dinov2", **TINY_HF}))
    _one_line_error(ViTSpec(path=str(empty)), "'.*empty' has no \\*.safetensors weights")
    (empty / "model.safetensors").write_bytes((Path(folders["dinov2"]) / "model.safetensors").read_bytes()[:-100])
    _one_line_error(ViTSpec(path=str(empty)), "model.safetensors: truncated or corrupted")


def test_weights_of_another_model_are_refused_naming_tensors(folders, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(CLIPVisionConfig(**TINY_HF).to_json_string())
    (foreign / "model.safetensors").write_bytes((Path(folders["dinov2"]) / "model.safetensors").read_bytes())
    _one_line_error(ViTSpec(path=str(foreign)), r"not the weights of this model: missing \d+ tensors \['")


def test_timm_safetensors_load_strictly(tmp_path):
    """timm's own loader takes any file once the classifier is dropped; mma's names the tensors that do not fit."""
    spec = vit_spec("timm", {}, seed=3)
    source = load_vit(spec)
    save_file(dict(source.state_dict()), tmp_path / "vit.safetensors")
    loaded = load_vit(dataclasses.replace(spec, seed=0, weights=str(tmp_path / "vit.safetensors")))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    other = timm.create_model("resnet18", num_classes=0)
    save_file(other.state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(BackboneError, match=r"resnet.safetensors: not the weights of this model: missing 30 tensors"):
        load_vit(dataclasses.replace(spec, weights=str(tmp_path / "resnet.safetensors")))


@pytest.mark.parametrize(("recipe", "expected"), [("lavin-7b", "3,781,296"), ("lavin-13b", "5,390,080")])
def test_lavin_recipes_take_a_clip_folder_with_the_paper_count(recipe, expected, tmp_path, capsys):
    """A config-only folder describes CLIP ViT-L/14 on the meta device; the count is LaVIN's, as with timm's ViT."""
    CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
    ).save_pretrained(tmp_path)
    recipe_file = ROOT / "recipes" / "scienceqa" / f"{recipe}.yaml"
    main(["params", "--config", str(recipe_file), "--model.model.vit.path", str(tmp_path)])
    assert f"trainable parameters: {expected} of" in capsys.readouterr().out
