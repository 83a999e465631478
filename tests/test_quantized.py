"""4-bit backbones (bitsandbytes NF4, which runs on this CPU): every adapter trains on them, the packed weights
never change, and the quantized model stays close to the full-precision one."""

import dataclasses

import lightning as L
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from conftest import TINY_LLM, LossLog, collator_for, perturb, tiny_config, tiny_trainer

from mma.backbones import LLMSpec, load_llm
from mma.backbones.quantize import keep_4bit_layout
from mma.build import build_model
from mma.data import SyntheticVQADataModule
from mma.errors import ConfigError
from mma.module import MMAModule
from mma.optim import OptimizerConfig, make_optimizer

# NF4 keeps 16 levels per weight: on this random tiny model the logits move by up to ~1 (their spread is ~10).
LOGIT_TOLERANCE = 1.5


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    """The tiny random LLaMA saved as a Hugging Face folder, so it can be loaded quantized like real weights."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = load_llm(LLMSpec(config=TINY_LLM))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _quantized_config(folder, adapter: str, **adapter_config):
    config = tiny_config(adapter, **adapter_config)
    return dataclasses.replace(config, llm=LLMSpec(path=str(folder), quantization="nf4"))


def test_nf4_logits_stay_close_to_full_precision(weights_folder):
    full, _ = load_llm(LLMSpec(path=str(weights_folder)))
    quantized, _ = load_llm(LLMSpec(path=str(weights_folder), quantization="nf4"))
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, Linear4bit)
    assert quantized.model.embed_tokens.weight.dtype == torch.float32  # unquantized parts keep the dtype
    tokens = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        difference = (quantized(tokens).logits - full(tokens).logits).abs()
    assert difference.max() < LOGIT_TOLERANCE
    assert difference.max() > 0  # it really is quantized


@pytest.mark.parametrize("adapter", ["lora", "lavin", "llama-adapter-v2"])
def test_adapters_train_on_a_4bit_llm_and_leave_it_untouched(weights_folder, adapter):
    L.seed_everything(0, verbose=False)
    module = MMAModule(_quantized_config(weights_folder, adapter), OptimizerConfig(lr=3e-2), max_length=192)
    module.configure_model()
    packed = {n: p.detach().clone() for n, p in module.named_parameters() if p.dtype == torch.uint8}
    assert packed  # the LLM's linears are 4-bit
    if adapter == "llama-adapter-v2":  # bias and scale wrap the 4-bit layers themselves
        assert isinstance(module.model.llm.model.layers[1].mlp.down_proj.base, Linear4bit)
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    log = LossLog()
    data = SyntheticVQADataModule(train_size=8, image_size=32, batch_size=8)
    trainer = tiny_trainer(max_steps=30, callbacks=[log])
    trainer.fit(module, datamodule=data)
    parameters = dict(module.named_parameters())
    for name, before in packed.items():
        assert torch.equal(parameters[name], before), f"quantized {name} changed"
    assert all(not torch.equal(parameters[name], before) for name, before in trainable.items())
    first, last = sum(log.losses[:3]) / 3, sum(log.losses[-3:]) / 3
    assert last < 0.75 * first, log.losses


def test_quantization_without_weights_or_int8_of_a_gguf_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="quantization 'nf4' needs weights to quantize"):
        load_llm(LLMSpec(config=TINY_LLM, quantization="nf4"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ConfigError, match="cannot load a GGUF file with bitsandbytes 8-bit quantization"):
        load_llm(LLMSpec(path=str(gguf), quantization="int8"))


def test_paged_optimizer_on_cpu_is_refused_and_8bit_runs():
    param = torch.nn.Parameter(torch.ones(8, 8))
    with pytest.raises(ConfigError, match="'paged_adamw' pages its states .* needs a CUDA device"):
        make_optimizer([{"params": [param]}], OptimizerConfig(name="paged_adamw"), torch.device("cpu"))
    optimizer = make_optimizer([{"params": [param]}], OptimizerConfig(name="adamw8bit"), torch.device("cpu"))
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert not torch.equal(param, torch.ones(8, 8))


def test_streaming_nf4_load_equals_transformers_own_4bit_load(weights_folder):
    """Same packed weights and quantization statistics, and (same kernels) the same logits, bit for bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours, _ = load_llm(LLMSpec(path=str(weights_folder), quantization="nf4"))
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    reference = AutoModelForCausalLM.from_pretrained(weights_folder, quantization_config=config).eval()
    keep_4bit_layout(reference)  # the same kernel for both: bitsandbytes' CPU inference repacking is off in mma
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert set(ours_state) == set(reference_state)
    for name, tensor in reference_state.items():
        assert torch.equal(ours_state[name], tensor), name
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, reference(tokens).logits)


def test_quantizing_a_loaded_model_equals_the_streaming_load(weights_folder):
    """The path GGUF backbones take (dense in memory, then NF4) gives what the streaming load gives."""
    from mma.backbones.quantize import load_nf4, quantize_in_place

    dense, _ = load_llm(LLMSpec(path=str(weights_folder)))
    quantize_in_place(dense, torch.float32)
    streamed = load_nf4(weights_folder, torch.float32)
    dense_state, streamed_state = dense.state_dict(), streamed.state_dict()
    assert set(dense_state) == set(streamed_state)
    for name, tensor in streamed_state.items():
        assert torch.equal(dense_state[name], tensor), name


def test_a_no_grad_pass_changes_neither_4bit_weights_nor_later_gradients(weights_folder, samples):
    """Validation or generation between training steps must not switch the 4-bit layers to bitsandbytes' CPU
    inference kernel, which rewrites the packed weights and has no backward."""
    grads = []
    for no_grad_pass_first in (False, True):
        torch.manual_seed(0)
        model = build_model(_quantized_config(weights_folder, "lavin"))
        perturb(model)
        batch = collator_for(model)(samples)
        packed = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
        if no_grad_pass_first:
            with torch.no_grad():
                model.loss(batch)
        for name, param in model.named_parameters():
            if name in packed:
                assert torch.equal(param, packed[name]), name
        model.train()
        model.loss(batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
