"""MemVP: the FFN memory against a hand computation, text-only rows, generation, checkpointing, merge, settings."""

import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLM, collator_for, image, perturb, tiny_config, tiny_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mma.adapters.base import VISUAL_TOKENS
from mma.adapters.memvp import MemoryFFN, MemoryPositions, MemVP
from mma.build import build_model
from mma.checkpoint import load_adapter, save_adapter
from mma.commands.merge import merge_to_folder
from mma.errors import ConfigError
from mma.layout import SequenceLayout
from mma.module import MMAModule


class _Layer(nn.Module):
    """A decoder layer reduced to its FFN: it takes keyword arguments, as a transformers layer does, and does not
    pass them to ``mlp``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.mlp(x)


def _one_layer(**settings) -> tuple[_Layer, MemVP]:
    """A tiny FFN (d 64) wrapped with a 5-slot memory whose E1, E2 are random."""
    torch.manual_seed(0)
    config = MemVP(memory_slots=5, memory_scale=0.3, visual_scale=0.5, **settings)
    positions = MemoryPositions(64, config, torch.device("cpu"))
    with torch.no_grad():
        positions.value.normal_()
    layer = _Layer(LlamaMLP(LlamaConfig(**TINY_LLM)))
    layer.mlp = MemoryFFN(layer.mlp, positions, config)
    layer.mlp.listen_to(layer)
    return layer.eval(), config


def _hand_memory(x, visual, e1, e2, config: MemVP) -> torch.Tensor:
    """The memory term as the papers write it, with ADEM-VL's drop done as its code does it (sort, threshold)."""
    v = F.pad(config.visual_scale * visual, (0, 0, 0, config.memory_slots - visual.shape[1]))  # (B, M, d)
    keys, values = v + e1, v + e2
    if config.memory_kernel == "memvp":
        scores = F.silu(torch.einsum("btd,bmd->btm", x, keys))
    else:
        scores = torch.einsum("btd,bmd->btm", F.silu(x), F.silu(keys))
    if config.memory_drop_fraction:
        ordered, _ = scores.sort(dim=2)
        threshold = ordered[:, :, int(config.memory_drop_fraction * scores.shape[2])].unsqueeze(2)
        scores = scores * (scores >= threshold)
    return config.memory_scale * torch.einsum("btm,bmd->btd", scores, values)


@pytest.mark.parametrize(
    "settings", [{}, {"memory_kernel": "adem-vl", "memory_drop_fraction": 0.4}], ids=["memvp", "adem-vl"]
)
def test_memory_term_matches_a_hand_computation(settings):
    """``FFN(x) + s act(x (V + E1)^T) (V + E2)``, V scaled and zero-padded to the slots, V reaching the FFN
    through the layer's keyword arguments; a row without visual tokens reads E1, E2 alone."""
    layer, config = _one_layer(**settings)
    x, visual = torch.randn(2, 4, 64), torch.randn(2, 3, 64)
    visual[1] = 0  # a text-only row, as the model fills it
    positions, ffn = layer.mlp.positions, layer.mlp.mlp
    with torch.no_grad():
        out = layer(x, **{VISUAL_TOKENS: visual})
        expected = ffn(x) + _hand_memory(x, visual, positions.key, positions.value, config)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        no_images = layer(x)  # a batch without images passes no visual tokens at all
        static = ffn(x) + _hand_memory(x, torch.zeros(2, 0, 64), positions.key, positions.value, config)
    torch.testing.assert_close(no_images, static, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], no_images[1], rtol=0, atol=1e-6)
    assert (out[0] - no_images[0]).abs().max() > 1e-3


# Scales of 1 instead of the authors' 0.1 and 0.01, so that the tiny model's visual memory moves its outputs.
LOUD = dict(memory_scale=1.0, visual_scale=1.0)


def _batch(model, seed: int = 0) -> dict:
    return collator_for(model)(
        [
            {"prompt": "What is in the picture?", "answer": "a cat", "image": image(seed)},
            {"prompt": "Name a fruit, please.", "answer": "pear", "image": None},
            {"prompt": "Count.", "answer": "three", "image": image(seed + 2)},
        ]
    )


def test_text_only_rows_are_unchanged_by_the_visual_memory():
    """A text-only row reads no image: its outputs do not move when the batch's pictures change, and while E2 is
    still zero they are the backbone's, however far the projector and ViT adapters have moved."""
    model = tiny_model("memvp", **LOUD)
    perturb(model)
    with torch.no_grad():
        for layer in model.llm.model.layers:
            layer.mlp.positions.value.zero_()
    model.eval()
    first, second = _batch(model, seed=0), _batch(model, seed=5)
    with torch.no_grad():
        hidden = model.hidden_states(first)
        moved = model.hidden_states(second)
    torch.testing.assert_close(moved[1], hidden[1], rtol=0, atol=0)
    assert (moved[0] - hidden[0]).abs().max() > 1e-4
    bare = tiny_model("none")
    bare.layout = model.layout
    with torch.no_grad():
        torch.testing.assert_close(bare.hidden_states(first)[1], hidden[1], rtol=0, atol=1e-6)


def test_the_authors_projector_init_changes_image_rows_before_any_step():
    """Identity at init needs the zeroed projector output: with the authors' xavier init the values ``0.01 V`` are
    not zero, so image rows move (text-only rows do not)."""
    model = tiny_model("memvp", projector_zero_init=False, **LOUD).eval()
    bare = tiny_model("none")
    bare.layout = model.layout
    batch = _batch(model)
    with torch.no_grad():
        change = (model.hidden_states(batch) - bare.hidden_states(batch)).abs().amax(dim=(1, 2))
    assert change[0] > 1e-4 and change[2] > 1e-4 and change[1] < 1e-6


def test_generation_with_kv_cache_matches_full_recompute():
    model = tiny_model("memvp", **LOUD)
    perturb(model)
    model.eval()
    batch = collator_for(model)(
        [{"prompt": s["prompt"], "answer": None, "image": s["image"]} for s in _prompt_samples()]
    )
    cached = model.generate(batch, max_new_tokens=12, use_cache=True)
    assert cached == model.generate(batch, max_new_tokens=12, use_cache=False)
    assert all(len(tokens) > 0 for tokens in cached)


def _prompt_samples() -> list[dict]:
    return [
        {"prompt": "What is in the picture?", "image": image(0)},
        {"prompt": "Name a fruit, please, in one word.", "image": None},
        {"prompt": "Count.", "image": image(2)},
    ]


def _gradients(model) -> list[torch.Tensor]:
    model.loss(_batch(model)).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["mma", "transformers"])
def test_checkpointed_layers_give_the_same_gradients(kind):
    """mma's activation checkpointing replays a decoder layer with its hooks; transformers' replays its forward
    without them, so the FFN memory keeps the tokens of the layer's last call."""
    grads = []
    for checkpointing in (False, True):
        L.seed_everything(0, verbose=False)
        config = tiny_config("memvp", memory_dropout=0.0, vit_dropout=0.0, **LOUD)
        module = MMAModule(config, activation_checkpointing=checkpointing and kind == "mma")
        module.configure_model()
        perturb(module.model)
        module.model.train()
        if checkpointing and kind == "transformers":
            module.model.llm.activation_checkpointing_enable({"use_reentrant": False})
            for layer in module.model.llm.model.layers:  # it checkpoints layers in train mode only; mma keeps
                layer.training = True  # backbones in eval, so this is the case of another trainer
        grads.append(_gradients(module.model))
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_merge_is_refused_with_the_reason(tmp_path):
    model = tiny_model("memvp")
    folder = save_adapter(model, tiny_config("memvp"), tmp_path / "adapter")
    with pytest.raises(ConfigError, match="adapter 'memvp' cannot be merged into the LLM: its FFN memory holds"):
        merge_to_folder(folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_multiscale_memory_pools_the_patch_grid_before_the_projector():
    """ADEM-VL's grids: the 4 x 4 patch grid of the tiny ViT as it is, then pooled to 2 x 2: 20 memory tokens."""
    config = tiny_config("memvp", memory_grids=[4, 2])
    config = dataclasses.replace(config, visual=dataclasses.replace(config.visual, tokens="patches"))
    torch.manual_seed(0)
    model = build_model(config)
    inputs = []
    model.projector.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    perturb(model)
    with torch.no_grad():
        visual, class_token = model.encode_images(torch.stack([image(0), image(1)]))
    assert visual.shape == (2, 20, 64) and class_token is None
    patches = model.vit.forward_features(torch.stack([image(0), image(1)]))[:, 1:]  # (2, 16, 32)
    pooled = patches.unflatten(1, (2, 2, 2, 2)).mean(dim=(2, 4)).flatten(1, 2)  # 2 x 2 blocks of the 4 x 4 grid
    torch.testing.assert_close(inputs[0], torch.cat([patches, pooled], dim=1))
    assert torch.isfinite(model.loss(_batch(model)))


def _adem_vl_config(**settings):
    """ADEM-VL as its code runs by default: the 4 x 4 patch grid and its 2 x 2 pooling in the memory, the class
    token as one input token."""
    config = tiny_config("memvp", memory_grids=[4, 2], class_token_input=True, **settings)
    return dataclasses.replace(config, visual=dataclasses.replace(config.visual, tokens="patches"))


def _adem_vl_model(**settings):
    torch.manual_seed(0)
    return build_model(_adem_vl_config(**settings))


def test_class_token_input_takes_one_slot_through_its_own_projector():
    """Image rows get one slot, filled with the ViT's class token through the class projector; text-only rows
    none; the pooled patches still fill the memory."""
    model = _adem_vl_model(**LOUD)
    perturb(model)
    model.eval()
    batch = _batch(model)
    assert (batch["input_ids"] == model.layout.image_slot).sum(dim=1).tolist() == [1, 0, 1]
    pixels = torch.stack([image(0), image(2)])
    with torch.no_grad():
        visual, class_token = model.encode_images(pixels)
        features = model.vit.forward_features(pixels)  # (2, 1 + 16, 32), final norm applied
        embeddings, layer_inputs = model.embed(batch["input_ids"], batch["pixel_values"], batch["has_image"])
    assert visual.shape == (2, 20, 64) and class_token.shape == (2, 1, 64)
    torch.testing.assert_close(class_token, model.class_projector(features[:, :1]))
    slots = batch["input_ids"] == model.layout.image_slot
    torch.testing.assert_close(embeddings[slots], class_token[:, 0])
    torch.testing.assert_close(layer_inputs[VISUAL_TOKENS][[0, 2]], visual)
    assert all(p.requires_grad for p in model.class_projector.parameters())
    assert model.layout.describe()["rows"]["image"].endswith("'Image: ' [class token] '\\n' prompt ' ' answer [EOS]")


def test_class_token_input_generates_the_same_with_and_without_cache():
    model = _adem_vl_model(**LOUD)
    perturb(model)
    model.eval()
    batch = collator_for(model)([{**s, "answer": None} for s in _prompt_samples()])
    cached = model.generate(batch, max_new_tokens=8, use_cache=True)
    assert cached == model.generate(batch, max_new_tokens=8, use_cache=False)


def test_class_token_input_exports_its_projector_and_reloads_bit_exact(tmp_path):
    model = _adem_vl_model()
    perturb(model)
    config = _adem_vl_config()
    folder = save_adapter(model, config, tmp_path / "adapter")
    fresh = _adem_vl_model()
    load_adapter(fresh, folder, config)
    for name, tensor in model.class_projector.state_dict().items():
        assert torch.equal(fresh.class_projector.state_dict()[name], tensor), name
    batch = _batch(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().hidden_states(batch), model.eval().hidden_states(batch), rtol=0, atol=0)


def test_class_token_input_needs_patch_tokens_beside_it():
    with pytest.raises(ConfigError, match="the class token in the sequence goes beside patch tokens, not"):
        tiny_model("memvp", class_token_input=True)
    with pytest.raises(ConfigError, match="class_token_in_sequence adds the class token beside visual tokens"):
        SequenceLayout(visual_in_sequence=True, class_token_in_sequence=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"memory_slots": 0}, "memory_slots=0 must be at least 1"),
        ({"memory_scale": 0.0}, "memory_scale=0.0 must be greater than 0"),
        ({"memory_dropout": 1.0}, r"memory_dropout=1.0 must be in \[0, 1\)"),
        ({"memory_drop_fraction": -0.1}, r"memory_drop_fraction=-0.1 must be in \[0, 1\)"),
        ({"memory_kernel": "softmax"}, "memory_kernel='softmax' must be memvp or adem-vl"),
        ({"memory_grids": [0]}, "memory_grids=\\[0\\] must hold sides of at least 1"),
        ({"vit_hidden": -1}, "vit_hidden=-1 must be at least 0"),
    ],
)
def test_settings_out_of_range_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        MemVP(**settings)


def test_memory_that_cannot_hold_the_visual_tokens_is_refused():
    with pytest.raises(ConfigError, match="2 visual tokens per image do not fit memory_slots=1"):
        tiny_model("memvp", memory_slots=1)
    with pytest.raises(ConfigError, match="pool the square patch grid of visual.tokens: patches"):
        tiny_model("memvp", memory_grids=[2])


def test_parameters_per_part():
    """E1, E2: 2 x slots x d once for all layers; ViT: 2 x C x hidden per block, none with vit_hidden 0."""
    model = tiny_model("memvp", memory_slots=10, vit_hidden=3)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if n.startswith("llm.")) == 2 * 10 * 64
    assert sum(v for n, v in trainable.items() if n.startswith("vit.")) == 2 * (2 * 32 * 3)
    assert not any(p.requires_grad for p in tiny_model("memvp", vit_hidden=0).vit.parameters())
    shared = {id(layer.mlp.positions) for layer in model.llm.model.layers}
    assert len(shared) == 1
