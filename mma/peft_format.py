"""LoRA adapters in peft's own folder format, for tools that load them with ``PeftModel.from_pretrained``.

Only the LLM's LoRA goes in: a peft folder adapts one causal LM, and the projector, modality token and any ViT
LoRA have no place in it (mma's own folder format keeps everything).
"""

import copy
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from mma.checkpoint import write_folder_atomically
from mma.errors import AdapterError
from mma.model import VisionLanguageModel

PEFT_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model's weights


def save_peft_lora(
    model: VisionLanguageModel, out: str | Path, base_model_name_or_path: str | None, overwrite: bool = False
) -> Path:
    """Write the LLM's LoRA weights and ``LoraConfig`` as ``PeftModel.save_pretrained`` would, atomically."""
    peft_configs = getattr(model.llm, "peft_config", None)
    if not peft_configs:
        raise AdapterError("only LoRA adapters have a peft folder format; this model's LLM has no peft layers")
    config = copy.deepcopy(peft_configs["default"])
    config.base_model_name_or_path = base_model_name_or_path
    config.task_type = "CAUSAL_LM"
    state = get_peft_model_state_dict(model.llm, adapter_name="default")
    tensors = {PEFT_PREFIX + name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}

    def write(folder: Path) -> None:
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(folder)

    return write_folder_atomically(Path(out), write, overwrite, writer="mma.peft_format.save_peft_lora")
