"""LoRA exported in peft's folder format loads with ``PeftModel.from_pretrained`` and computes the same logits."""

import pytest
import torch
from conftest import TINY_LLM, tiny_model, tiny_trainer
from peft import PeftModel

from mma.backbones import LLMSpec, load_llm
from mma.errors import AdapterError
from mma.peft_format import save_peft_lora


def test_peft_folder_loads_with_peft_and_matches(tmp_path):
    model = tiny_model("lora")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    folder = save_peft_lora(model, tmp_path / "peft", base_model_name_or_path=None)
    base, _ = load_llm(LLMSpec(config=TINY_LLM))  # the same seed: the same frozen weights as the adapted model
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    tokens = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        expected = model.llm(tokens).logits
        logits = peft_model(tokens).logits
        unadapted = load_llm(LLMSpec(config=TINY_LLM))[0](tokens).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert (logits - unadapted).abs().max() > 1e-2


def test_only_lora_has_a_peft_format(tmp_path):
    with pytest.raises(AdapterError, match="only LoRA adapters have a peft folder format"):
        save_peft_lora(tiny_model("lavin"), tmp_path / "peft", None)


def test_export_command_writes_the_peft_folder(tmp_path):
    import lightning as L
    from conftest import tiny_config
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mma.cli import main
    from mma.data import SyntheticVQADataModule
    from mma.module import MMAModule

    L.seed_everything(0, verbose=False)
    module = MMAModule(tiny_config("lora"), max_length=192)
    data = SyntheticVQADataModule(train_size=4, image_size=32, batch_size=2)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(max_steps=2, enable_checkpointing=True, callbacks=[checkpoints], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    main(
        [
            "export",
            "--ckpt",
            str(tmp_path / "ckpt" / "last.ckpt"),
            "--out",
            str(tmp_path / "mma"),
            "--peft",
            str(tmp_path / "peft"),
        ]
    )
    peft_model = PeftModel.from_pretrained(load_llm(LLMSpec(config=TINY_LLM))[0], tmp_path / "peft").eval()
    tokens = torch.tensor([[1, 50, 51, 52]])
    module.model.eval()  # LoRA dropout off, as in the loaded peft model
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, module.model.llm(tokens).logits, rtol=0, atol=1e-5)
