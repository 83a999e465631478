"""LoRA (arXiv 2106.09685) through peft: ``W x + (alpha / r) B A x`` on chosen linear layers, B zero-initialised.

peft does the work: ``inject_adapter_in_model`` wraps the targeted linears of the frozen backbone in place (no
``PeftModel`` around it), so the VLM keeps calling the backbone it knows. peft's layers declare their own adapter
submodules and base layer, which is how mma finds what trains (``mma.adapters.base``). Merge is peft's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mma.adapters.base import AdapterSettings, register_adapter, register_fold
from mma.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from mma.model import VisionLanguageModel


@dataclass
class LoRA(AdapterSettings):
    """LoRA settings.

    Args:
        rank: rank r of the update.
        alpha: scaling numerator; the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA branch's input.
        target_modules: LLM linear layers to adapt, by module name (LLaMA: q_proj, k_proj, v_proj, o_proj,
            gate_proj, up_proj, down_proj).
        vit_target_modules: ViT linear layers inside its blocks to adapt too, by module name (timm: qkv, proj, fc1,
            fc2; CLIP and SigLIP: q_proj, k_proj, v_proj, out_proj, fc1, fc2; DINOv2: q_proj, k_proj, v_proj,
            o_proj, fc1, fc2); empty: the ViT stays bare. Layers outside the blocks (SigLIP's pooling head) feed
            no visual token and are never adapted.
    """

    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    vit_target_modules: list[str] = field(default_factory=list)

    name: ClassVar[str] = "lora"

    def validate(self) -> None:
        self.check("rank", self.rank >= 1, "must be at least 1")
        self.check("lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        self.check("target_modules", bool(self.target_modules), "must name at least one layer")


def _peft_config(config: LoRA, targets: list[str]) -> LoraConfig:
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout, target_modules=targets)


@register_adapter(LoRA)
def attach_lora(model: VisionLanguageModel, config: LoRA) -> None:
    """Inject LoRA into the LLM's target linears, and into the ViT's when asked."""
    inject_adapter_in_model(_peft_config(config, config.target_modules), model.llm)
    if config.vit_target_modules:
        inject_adapter_in_model(_peft_config(config, _vit_targets(model, config.vit_target_modules)), model.vit)


def _vit_targets(model: VisionLanguageModel, names: list[str]) -> list[str]:
    """Full names of the modules called ``names`` inside the ViT's blocks (peft matches full names exactly)."""
    blocks = {id(block) for block in model.tower.blocks}
    prefixes = tuple(f"{name}." for name, module in model.vit.named_modules() if id(module) in blocks)
    inside = [name for name, _ in model.vit.named_modules() if name.startswith(prefixes)]
    targets = [name for name in inside if name.rpartition(".")[2] in names]
    if not targets:
        linears = sorted({n.rpartition(".")[2] for n in inside if isinstance(model.vit.get_submodule(n), nn.Linear)})
        raise ConfigError(f"adapter 'lora': no ViT block layer is called {names}; its linears are {linears}")
    return targets


@register_fold(LoRA)
def fold_lora(model: VisionLanguageModel, modality: str | None) -> PreTrainedModel:
    """Add every LoRA update of the LLM into its base linear (peft's own ``merge``) and unwrap the layer.

    LoRA does not route, so the modality is irrelevant; LoRA in the ViT is not part of the LLM and stays out.
    """
    llm = model.llm
    layers = [(name, module) for name, module in llm.named_modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ConfigError("this LoRA adapter has no LLM layers: there is nothing to merge")
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent), child, layer.get_base_layer())
    return llm
