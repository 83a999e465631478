"""The Lightning module on tiny backbones: it learns, touches only adapters, resumes exactly, stops on NaN."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLM, LossLog, assert_backbones_in_eval, tiny_config, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mma.adapters import registered_adapters
from mma.data import SyntheticVQADataModule
from mma.errors import TrainingDiverged
from mma.module import MMAModule, OptimizerConfig


def _run(
    tmp_path,
    max_steps: int,
    seed: int = 0,
    ckpt_path=None,
    callbacks=(),
    train_size: int = 16,
    lr: float = 1e-2,
    **trainer_kwargs,
) -> MMAModule:
    L.seed_everything(seed, verbose=False)
    module = MMAModule(tiny_config(), OptimizerConfig(lr=lr, warmup_fraction=0.2), max_length=192)
    data = SyntheticVQADataModule(
        train_size=train_size, val_size=4, test_size=4, image_size=32, batch_size=4, eval_batch_size=4
    )
    settings = {"enable_checkpointing": True, **trainer_kwargs}
    trainer = tiny_trainer(max_steps=max_steps, default_root_dir=tmp_path, callbacks=list(callbacks), **settings)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def _trainable(module: MMAModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def _every_step(tmp_path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True, filename="{step}")


def test_loss_goes_down_and_only_adapters_change(tmp_path):
    L.seed_everything(0, verbose=False)
    reference = MMAModule(tiny_config(), max_length=192)
    reference.configure_model()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    log = LossLog()
    module = _run(tmp_path, max_steps=40, train_size=8, callbacks=[log], enable_checkpointing=False, lr=3e-2)
    after = module.state_dict()
    trainable = set(_trainable(module))
    for key, value in before.items():
        if key in trainable:
            assert not torch.equal(after[key], value), f"{key} did not train"
        else:
            assert torch.equal(after[key], value), f"frozen {key} changed"
    first, last = sum(log.losses[:4]) / 4, sum(log.losses[-4:]) / 4
    assert last < 0.75 * first, log.losses


def test_checkpoint_holds_only_trainable_weights(tmp_path):
    module = _run(tmp_path, max_steps=2, callbacks=[_every_step(tmp_path)])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(_trainable(module))
    assert "optimizer_states" in checkpoint and "rng_state" in checkpoint


def test_same_seed_gives_bit_identical_adapters(tmp_path):
    first = _trainable(_run(tmp_path / "a", max_steps=5, enable_checkpointing=False))
    second = _trainable(_run(tmp_path / "b", max_steps=5, enable_checkpointing=False))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_compiled_training_loss_gives_the_eager_loss_and_gradients(samples):
    """``compile=True``: the training loss and every adapter gradient as eager (dropout off: compiled and eager
    draw different random masks); the model itself is not wrapped, so its checkpoint keys stay the same."""
    from conftest import collator_for, perturb

    found = []
    for compiled in (False, True):
        torch.manual_seed(0)
        module = MMAModule(tiny_config(dropout=0.0), max_length=192, compile=compiled)
        module.configure_model()
        perturb(module.model)
        batch = collator_for(module.model)(samples) | {"pid": ["a", "b", "c"]}
        loss = module._training_loss(batch)
        loss.backward()
        found.append((loss.detach(), {k: p.grad for k, p in module.named_parameters() if p.requires_grad}))
    (eager, eager_grads), (compiled, compiled_grads) = found
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for key, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


class _Killed(Exception):
    pass


class _KillAt(Callback):
    """Dies like a killed process right after ``step`` optimizer steps (and their checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _Killed


def test_killed_and_resumed_run_continues_exactly(tmp_path):
    """Stopped mid-epoch at step 3 of 4-step epochs, then resumed to step 7: same weights as a straight run."""
    straight = _trainable(_run(tmp_path / "straight", max_steps=7, enable_checkpointing=False))
    with pytest.raises(_Killed):
        _run(tmp_path / "killed", max_steps=7, callbacks=[_every_step(tmp_path / "killed"), _KillAt(3)])
    resumed_module = _run(
        tmp_path / "resumed", max_steps=7, ckpt_path=tmp_path / "killed" / "step=3.ckpt", enable_checkpointing=False
    )
    assert resumed_module.global_step == 7
    resumed = _trainable(resumed_module)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


class _PoisonAfter(Callback):
    """Turns one adapter weight into NaN after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.model.projector.net[0].weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="loss became nan at step 2"):
        _run(tmp_path, max_steps=6, callbacks=[_every_step(tmp_path), _PoisonAfter(2)])
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (tmp_path / "step=3.ckpt").exists()


@pytest.mark.parametrize("adapter", ["lavin", "llama-adapter-v2"])
def test_bf16_mixed_and_activation_checkpointing_train(tmp_path, adapter):
    log = LossLog()
    L.seed_everything(0, verbose=False)
    config = tiny_config(adapter)
    module = MMAModule(config, OptimizerConfig(lr=1e-2), max_length=192, activation_checkpointing=True)
    data = SyntheticVQADataModule(train_size=8, image_size=32, batch_size=4)
    trainer = tiny_trainer(precision="bf16-mixed", max_steps=4, callbacks=[log], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(log.losses) == 4 and all(torch.isfinite(torch.tensor(log.losses)))


def test_activation_checkpointing_gives_the_same_gradients(samples):
    from conftest import collator_for

    grads = []
    for checkpointing in (False, True):
        L.seed_everything(0, verbose=False)
        module = MMAModule(tiny_config(dropout=0.0), activation_checkpointing=checkpointing)
        module.configure_model()
        with torch.no_grad():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        module.model.train()
        module.model.loss(collator_for(module.model)(samples)).backward()
        grads.append([p.grad.clone() for p in module.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_predict_writes_generated_answers(tmp_path):
    import json

    from mma.callbacks import PredictionWriter

    module = MMAModule(tiny_config(), max_length=192, max_new_tokens=4)
    data = SyntheticVQADataModule(test_size=3, image_size=32, eval_batch_size=2)
    trainer = tiny_trainer(default_root_dir=tmp_path, callbacks=[PredictionWriter()])
    trainer.predict(module, datamodule=data, return_predictions=False)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(row["question"] and row["expected"].startswith("The answer is") for row in rows)
    assert all(isinstance(row["generated"], str) for row in rows)


def test_image_transform_follows_the_vit_and_takes_overrides():
    module = MMAModule(tiny_config(), image_transform={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
    module.configure_model()
    config = module.image_data_config()
    assert config["input_size"] == (3, 32, 32) and config["mean"] == (0.0, 0.0, 0.0)
    assert config["interpolation"] == module.model.vit.pretrained_cfg["interpolation"]
    from PIL import Image

    pixels = module.make_collator().transform(Image.new("RGB", (32, 32), (255, 255, 255)))
    assert pixels.shape == (3, 32, 32) and torch.allclose(pixels, torch.ones_like(pixels))


class ModeCheck(Callback):
    """Checks, at every training step, that backbones are in eval mode and adapter-owned modules train."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        assert_backbones_in_eval(module.model)
        self.checked += 1


@pytest.mark.parametrize("adapter", registered_adapters())
def test_backbones_stay_in_eval_during_a_lightning_fit(adapter):
    """Lightning switches the module to train mode around validation; only adapter-owned modules may follow."""
    check = ModeCheck()
    module = MMAModule(tiny_config(adapter), max_length=192)
    data = SyntheticVQADataModule(train_size=8, val_size=4, image_size=32, batch_size=2, eval_batch_size=2)
    trainer = tiny_trainer(max_steps=3, val_check_interval=2, limit_val_batches=1, callbacks=[check])
    trainer.fit(module, datamodule=data)
    assert check.checked == 3


def test_a_diverging_run_never_writes_a_non_finite_checkpoint(tmp_path):
    """With lr 1e3 an optimizer step breaks the weights while its loss was finite: the run stops at that step,
    and every checkpoint on disk (one per step) holds only finite tensors."""
    with pytest.raises(TrainingDiverged, match=r"optimizer step 5 left \d+ trainable tensor\(s\) non-finite"):
        _run(tmp_path, max_steps=8, lr=1e3, callbacks=[_every_step(tmp_path)])
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == ["last.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt", "step=4.ckpt"]
    for name in saved:
        state = torch.load(tmp_path / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), name


class _PoisonBeforeSave(Callback):
    """Turns one adapter weight into NaN after optimizer step ``step``, before the checkpoint callback runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.model.projector.net[0].weight.fill_(float("nan"))


def test_a_checkpoint_with_a_non_finite_weight_is_never_written(tmp_path):
    with pytest.raises(TrainingDiverged, match="refusing to save a checkpoint at step 2: 1 trainable tensor"):
        _run(tmp_path, max_steps=4, callbacks=[_PoisonBeforeSave(2), _every_step(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=1.ckpt"]


TINY_RECIPE = Path(__file__).parent / "sweep_fixtures" / "tiny.yaml"


def _fit_command(root: Path, *extra: str) -> list[str]:
    """`mma fit` of the tiny recipe for 12 steps (3 epochs of 4), ``last.ckpt`` every 2 steps, into ``root``."""
    options = ["--trainer.max_steps", "12", "--trainer.enable_checkpointing", "true"]
    options += ["--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(root)]
    return [sys.executable, "-m", "mma.cli", "fit", "--config", str(TINY_RECIPE), *options, *extra]


def _kill_after_saves(process: subprocess.Popen, last: Path, saves: int) -> None:
    """SIGKILL ``process`` as soon as it has written ``last`` ``saves`` times."""
    seen, stamp = 0, None
    while seen < saves:
        assert process.poll() is None, "the run ended before it could be killed"
        now = last.stat().st_mtime_ns if last.exists() else None
        seen, stamp = seen + (now != stamp), now
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def test_a_killed_fit_resumes_from_last_to_the_same_weights(tmp_path):
    """A real `kill -9` at a random step of 12, then `--ckpt_path last`: bit-identical to an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    straight = subprocess.Popen(_fit_command(tmp_path / "straight"), **quiet)
    killed = subprocess.Popen(_fit_command(tmp_path / "killed"), **quiet)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saves = random.randint(1, 4)  # killed between steps 2 and 10
    _kill_after_saves(killed, last, saves)
    step = torch.load(last, weights_only=True)["global_step"]
    assert 2 <= step < 12, (saves, step)
    resumed = subprocess.run(
        _fit_command(tmp_path / "killed", "--ckpt_path", "last"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {last}" in resumed.stderr and "not resumable" not in resumed.stderr
    assert straight.wait() == 0, straight.stderr.read()
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == expected["global_step"] == 12
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), (key, f"killed at step {step}")


def test_ckpt_path_takes_moved_backbones_but_refuses_other_model_settings(tmp_path, capsys):
    """LightningCLI would silently reload the checkpoint's model settings; mma honours a moved LLM folder and
    names any other setting that differs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mma.backbones.tokenizer import byte_tokenizer
    from mma.cli import main

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLM)).save_pretrained(tmp_path / "llm")
    byte_tokenizer().save_pretrained(tmp_path / "llm")
    fit = _fit_command(tmp_path / "run")[3:]  # `fit --config ...` without the interpreter
    main([*fit, "--trainer.max_steps", "2", "--model.model.llm.path", str(tmp_path / "llm")])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (tmp_path / "llm").rename(tmp_path / "moved")
    with pytest.raises(SystemExit):
        main(
            [
                *fit,
                "--model.model.llm.path",
                str(tmp_path / "moved"),
                "--model.model.adapter.hidden",
                "4",
                "--ckpt_path",
                str(ckpt),
            ]
        )
    err = capsys.readouterr().err
    assert f"{ckpt} was trained with other model settings: --model.model.adapter.hidden: checkpoint 8, given 4." in err
    main([*fit, "--trainer.max_steps", "4", "--model.model.llm.path", str(tmp_path / "moved"), "--ckpt_path", "last"])
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
