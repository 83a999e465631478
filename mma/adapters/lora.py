"""LoRA (arXiv 2106.09685) through peft: ``W x + (alpha / r) B A x`` on chosen linear layers, B zero-initialised.

peft does the work: ``inject_adapter_in_model`` wraps the targeted linears of the frozen backbone in place (no
``PeftModel`` around it), so the VLM keeps calling the backbone it knows. peft's layers declare their own adapter
submodules, which is how mma finds what trains (``mma.adapters.base``).
"""

from dataclasses import dataclass, field

from peft import LoraConfig, inject_adapter_in_model

from mma.adapters.base import register_adapter


@dataclass
class LoRAConfig:
    """LoRA settings.

    Args:
        rank: rank r of the update.
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the LoRA branch's input.
        target_modules: LLM linear layers to adapt, by module name (LLaMA: q_proj, k_proj, v_proj, o_proj,
            gate_proj, up_proj, down_proj).
        vit: also adapt the ViT.
        vit_target_modules: ViT linear layers to adapt (timm: qkv, proj, fc1, fc2).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    vit: bool = False
    vit_target_modules: list[str] = field(default_factory=lambda: ["qkv"])


def _peft_config(config: LoRAConfig, targets: list[str]) -> LoraConfig:
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)


@register_adapter("lora", LoRAConfig)
def attach_lora(model, config: LoRAConfig) -> None:
    """Inject LoRA into the LLM's target linears, and into the ViT's when asked."""
    inject_adapter_in_model(_peft_config(config, config.target_modules), model.llm)
    if config.vit:
        inject_adapter_in_model(_peft_config(config, config.vit_target_modules), model.vit)
