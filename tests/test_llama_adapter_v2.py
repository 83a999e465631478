"""LLaMA-Adapter V2: parity with peft's adaption prompt, the zero-init gated attention by hand, prompt keys and
values cached in generation, and joint training that updates only the batch source's parameters."""

import lightning as L
import pytest
import torch
from conftest import TINY_LLM, collator_for, tiny_config, tiny_model, tiny_trainer
from peft import AdaptionPromptConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mma.adapters.base import CAPTION, INSTRUCTION, source_parameters
from mma.adapters.llama_adapter_v2 import AdaptionPromptAttention
from mma.data import SyntheticVQADataModule
from mma.errors import ConfigError
from mma.module import MMAModule, OptimizerConfig

PEFT_LIKE = dict(gate="scalar", bias_scale=False, norms=False, visual_layers=0)
TOKENS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50, 51, 52, 53, 54, 55, 56, 57]])


def _prompted(model) -> list[AdaptionPromptAttention]:
    return [m for m in model.llm.modules() if isinstance(m, AdaptionPromptAttention)]


def test_logits_equal_peft_adaption_prompt_with_its_settings():
    """One ungated scalar per layer, no bias/scale, norms or visual prompt: peft's ``AdaptionPromptConfig``."""
    ours = tiny_model("llama-adapter-v2", prompt_layers=2, prompt_length=10, **PEFT_LIKE)
    peer = get_peft_model(
        tiny_model("none").llm, AdaptionPromptConfig(adapter_len=10, adapter_layers=2, task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, ours_attention in zip(peer.base_model.model.model.layers, _prompted(ours), strict=True):
            ours_attention.prompt_gate.weight.fill_(0.3 + torch.rand(1, generator=generator).item())
            layer.self_attn.adaption_prompt.copy_(ours_attention.prompt)
            layer.self_attn.adaption_gate.copy_(ours_attention.prompt_gate.weight)
        expected = peer(input_ids=TOKENS).logits
        actual = ours.llm(input_ids=TOKENS).logits
    assert (actual - expected).abs().max() < 1e-5
    assert (actual - tiny_model("none").llm(input_ids=TOKENS).logits).abs().max() > 1e-2  # the prompts act


def test_tanh_gated_prompt_attention_matches_a_hand_computation():
    """A 1-layer LLaMA with GQA (4 query heads, 2 key/value heads): the adapted layer adds, per head h,
    ``tanh(g_h) * softmax(q_h K_h^T / sqrt(d)) V_h`` with ``K = prompt W_k^T``, ``V = prompt W_v^T`` (kv head
    ``h // 2``) and un-rotated prompt keys, projected by ``W_o``."""
    config = LlamaConfig(**{**TINY_LLM, "num_hidden_layers": 1})
    torch.manual_seed(0)
    llm = LlamaForCausalLM(config).eval()
    attention = llm.model.layers[0].self_attn
    wrapped = AdaptionPromptAttention(attention, prompt_length=3, visual=False, gate="tanh")
    with torch.no_grad():
        wrapped.prompt_gate.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.randn(1, 5, config.hidden_size)
    positions = torch.arange(5)[None]
    cos, sin = llm.model.rotary_emb(x, positions)
    with torch.no_grad():
        base, _ = attention(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
        adapted, _ = wrapped(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
        heads, head_dim = 4, config.hidden_size // 4
        q = (x[0] @ attention.q_proj.weight.T).view(5, heads, head_dim)
        half = head_dim // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        q = q * cos[0][:, None] + rotated * sin[0][:, None]
        k = (wrapped.prompt[0] @ attention.k_proj.weight.T).view(3, 2, head_dim)
        v = (wrapped.prompt[0] @ attention.v_proj.weight.T).view(3, 2, head_dim)
        per_head = []
        for h in range(heads):
            scores = q[:, h] @ k[:, h // 2].T / head_dim**0.5  # (5 tokens, 3 prompt tokens)
            weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
            per_head.append(torch.tanh(wrapped.prompt_gate.weight[h]) * weights @ v[:, h // 2])
        expected = torch.cat(per_head, dim=-1) @ attention.o_proj.weight.T
    torch.testing.assert_close(adapted[0] - base[0], expected, rtol=1e-5, atol=1e-6)
    assert expected[:, :].abs().max() > 1e-3


def test_prompt_keys_and_values_are_computed_once_per_generation():
    model = tiny_model("llama-adapter-v2")
    model.eval()
    calls = []
    for attention in _prompted(model):
        attention.attention.k_proj.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[-2]))
    batch = collator_for(model)(
        [{"prompt": "Say it.", "answer": None, "image": None}, {"prompt": "Look.", "answer": None, "image": None}]
    )
    steps = len(model.generate(batch, max_new_tokens=6, stop_at_eos=False)[0])
    prompt_projections = [n for n in calls if n == 10]  # the 10-token static prompt of the one prompted layer
    assert steps == 6 and len(prompt_projections) == 1


def test_depth_settings_are_checked():
    with pytest.raises(ConfigError, match=r"prompt_layers=3 must be in 0..2 \(LLM depth\)"):
        tiny_model("llama-adapter-v2", prompt_layers=3)
    with pytest.raises(ConfigError, match=r"targets=\[.qkv.\] must be among"):
        tiny_model("llama-adapter-v2", targets=["qkv"])


def test_parameter_groups_follow_the_paper():
    """Caption data trains the projection (with the visual tokens' norm) and the early-fusion gates; instruction
    data everything else."""
    model = tiny_model("llama-adapter-v2")
    names = {id(p): n for n, p in model.named_parameters()}
    caption = {names[id(p)] for p in source_parameters(model, CAPTION)}
    instruction = {names[id(p)] for p in source_parameters(model, INSTRUCTION)}
    visual = {
        f"llm.model.layers.0.self_attn.{n}" for n in ("visual_gate.weight", "visual_norm.weight", "visual_norm.bias")
    }
    assert caption == {n for n in names.values() if n.startswith("projector.")} | visual
    assert not caption & instruction
    assert caption | instruction == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("caption_fraction", "source"), [(0.99, CAPTION), (0.01, INSTRUCTION)])
def test_a_batch_changes_only_its_source_group(tmp_path, caption_fraction, source):
    """With 99 of 100 samples from one source, every full batch is from that source (the other never fills one)."""
    L.seed_everything(0, verbose=False)
    module = MMAModule(tiny_config("llama-adapter-v2"), OptimizerConfig(lr=1e-2, warmup_fraction=0.0))
    module.configure_model()
    with torch.no_grad():  # open the gates so every parameter is on a path with signal
        for name, p in module.named_parameters():
            if name.endswith("gate.weight"):
                p.fill_(0.5)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    group = {id(p) for p in source_parameters(module.model, source)}
    data = SyntheticVQADataModule(train_size=100, image_size=32, batch_size=4, caption_fraction=caption_fraction)
    tiny_trainer(max_steps=2, default_root_dir=tmp_path).fit(module, datamodule=data)
    for name, p in module.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]) != (id(p) in group), name
