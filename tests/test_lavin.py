import pytest
import torch
from conftest import collator_for, image, perturb, tiny_model

from mma.adapters.lavin import LaVIN, RouterAdapter
from mma.layout import MODALITY_SLOT


def _routing(adapter: RouterAdapter, run) -> torch.Tensor:
    """Routing weights (B, 2) that ``adapter`` computes on the input it receives during ``run()``."""
    inputs = []
    handle = adapter.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    run()
    handle.remove()
    return adapter.routing_weights(inputs[0])


@pytest.mark.parametrize("dim", [4096, 5120, 1024])
def test_parameter_count_per_block_matches_lavin(dim):
    """20d + 10: down d*8+8, two grouped ups 2*(d*4+d), router 2d+2 (81,930 for d=4096)."""
    adapter = RouterAdapter(dim, LaVIN())
    assert sum(p.numel() for p in adapter.parameters()) == 20 * dim + 10
    assert sum(p.numel() for p in RouterAdapter(dim, LaVIN(router=False)).parameters()) == 13 * dim + 8


def test_grouped_up_projection_matches_a_grouped_conv():
    adapter = RouterAdapter(64, LaVIN(router=False))
    up = adapter.up[0]
    torch.nn.init.normal_(up.weight)
    torch.nn.init.normal_(up.bias)
    h = torch.randn(3, 5, 8)
    conv = torch.nn.functional.conv1d(h.transpose(1, 2), up.weight[:, :, None], up.bias, groups=2).transpose(1, 2)
    torch.testing.assert_close(up(h), conv)


def test_router_output_hand_computed():
    """x + s * (w0 B(h) + w1 D(h)), w = softmax(R(x0) / t), in eval mode (no dropout)."""
    torch.manual_seed(0)
    adapter = RouterAdapter(8, LaVIN(hidden=4, temperature=5.0, scale=0.5)).eval()
    for p in adapter.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 8)
    h = adapter.down(x)
    w = torch.softmax(adapter.router(x[:, 0]) / 5.0, dim=-1)
    torch.testing.assert_close(adapter.routing_weights(x), w)
    expected = x + 0.5 * (w[:, None, :1] * adapter.up[0](h) + w[:, None, 1:] * adapter.up[1](h))
    torch.testing.assert_close(adapter(x), expected)


def _train_experts(route_inputs: torch.Tensor, steps: int = 20) -> RouterAdapter:
    """A router adapter after Adam steps on a fixed regression, each sample routed from ``route_inputs[i]`` by a
    router held fixed (Adam would blow its rounding-level gradient up to full steps, varying the weights in time)."""
    torch.manual_seed(0)
    adapter = RouterAdapter(8, LaVIN(hidden=4, temperature=1.0, dropout=0.0))
    adapter.router.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(len(route_inputs), 5, 8), torch.randn(len(route_inputs), 5, 8)
    x[:, 0] = route_inputs
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(adapter(x), target).backward()
        optimizer.step()
    return adapter


def test_experts_stay_equal_while_every_sample_routes_alike():
    """Zero-init experts get gradients w0 G and w1 G: Adam moves them alike unless routing differs between samples."""
    alike = _train_experts(torch.randn(1, 8).expand(6, 8))
    assert alike.up[0].weight.abs().sum() > 0 and alike.expert_distance() < 1e-5
    apart = _train_experts(torch.randn(6, 8))
    assert apart.expert_distance() > 1e-2
    assert (
        RouterAdapter(8, LaVIN(hidden=4)).expert_distance()
        == 0.0
        == RouterAdapter(8, LaVIN(router=False)).expert_distance()
    )


def test_modality_token_is_attended_by_no_other_position(samples):
    """Changing the modality embedding changes no other position's output while adapters are at init."""
    model = tiny_model("lavin")
    batch = collator_for(model)(samples)
    assert (batch["input_ids"][:, 0] == MODALITY_SLOT).all()
    mask = model.attention_mask(batch["attention_mask"].bool())[:, 0]  # (B, Q, K)
    assert not mask[:, 1:, 0].any() and mask[:, 0, 0].all()
    before = model.hidden_states(batch)
    with torch.no_grad():
        model.modality_embedding.weight.mul_(-3.0)
    after = model.hidden_states(batch)
    valid = batch["attention_mask"].bool()
    valid[:, 0] = False
    torch.testing.assert_close(after[valid], before[valid], rtol=0, atol=0)
    assert not torch.allclose(after[:, 0], before[:, 0])


def test_routing_differs_by_modality_and_only_by_modality():
    model = tiny_model("lavin")
    perturb(model)
    model.eval()
    collate = collator_for(model)
    batch = collate(
        [
            {"prompt": "Describe it.", "answer": "a cat", "image": image(0)},
            {"prompt": "A longer question without a picture?", "answer": "no", "image": None},
            {"prompt": "Other words here.", "answer": "a dog", "image": image(1)},
        ]
    )
    routing = _routing(model.llm.model.layers[0].input_layernorm.adapter, lambda: model.token_logprobs(batch))
    assert not torch.allclose(routing[0], routing[1])
    torch.testing.assert_close(routing[0], routing[2])  # same modality, same routing, whatever the content


def test_vit_routing_is_per_image():
    """Each image is routed by its own class token. Block 0 sees the class token before it has attended to any
    patch (identical for every image), so routing can differ only from block 1 on."""
    model = tiny_model("lavin")
    perturb(model)
    adapter = model.vit.blocks[1].norm1.adapter
    weights = _routing(adapter, lambda: model.encode_images(torch.stack([image(0), image(1)])))
    assert not torch.allclose(weights[0], weights[1])


def test_ablation_switches_change_what_is_attached():
    no_vit = tiny_model("lavin", vit=False)
    assert not any(".adapter." in n for n, _ in no_vit.vit.named_parameters())
    no_llm = tiny_model("lavin", llm=False)
    assert no_llm.modality_embedding is None
    assert not any(".adapter." in n for n, _ in no_llm.llm.named_parameters())
    no_router = tiny_model("lavin", router=False)
    assert no_router.modality_embedding is None
    assert no_router.llm.model.layers[0].input_layernorm.adapter.router is None
