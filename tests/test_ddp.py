"""Scale-out through Lightning's DDP, from the recipe: two CPU processes (gloo) on the tiny backbones train the same
adapter as one process with the same effective batch, and checkpoint only the adapter.

Plain ``strategy: ddp`` works: a process whose batch holds only text-only questions runs no ViT, so the ViT
adapters and the projector get no gradient there, and ``MMAModule`` turns DDP's ``find_unused_parameters`` on so
that DDP does not wait forever for them.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from mma.build import build_model
from mma.checkpoint import load_adapter
from mma.commands.export import export_checkpoint
from mma.recipe import config_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "sweep_fixtures" / "tiny.yaml")
STEPS = 4  # rank 0's third batch of 2 is text-only: unused parameters on one process are covered
# Same updates up to float32 summation order: 4.4e-6 measured after 4 AdamW steps at lr 1e-2.
TOLERANCE = 2e-5


def _args(root: Path, batch_size: int) -> list[str]:
    return [
        f"--trainer.max_steps={STEPS}",
        "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.batch_size={batch_size}",
    ]


def _fit_two_processes(root: Path) -> Path:
    """``mma fit`` with DDP over 2 CPU processes; Lightning starts the second one. Returns the final checkpoint."""
    command = [sys.executable, "-m", "mma.cli", "fit", "--config", TINY, *_args(root, batch_size=2)]
    command += ["--trainer.strategy=ddp", "--trainer.devices=2"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the second rank too
        raise
    assert process.returncode == 0, output[-3000:]
    checkpoint = root / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == STEPS
    return checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The two-process checkpoint, and the trainable weights of one process at batch 4 after as many steps."""
    root = tmp_path_factory.mktemp("ddp")
    checkpoint = _fit_two_processes(root / "two")
    cli = config_cli(TINY, _args(root / "one", batch_size=4))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    keys = cli.model.trainable_state_keys()
    return checkpoint, {k: v.detach().clone() for k, v in cli.model.state_dict().items() if k in keys}


def test_two_processes_train_the_same_adapter_as_one(runs):
    checkpoint, single = runs
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=TOLERANCE, msg=key)


def test_two_process_checkpoint_holds_only_the_adapter_and_exports(runs, tmp_path):
    checkpoint, single = runs
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(single)
    folder = export_checkpoint(checkpoint, tmp_path / "adapter")
    model = build_model(tiny_config(dropout=0.0))
    load_adapter(model, folder, tiny_config(dropout=0.0))
    loaded = dict(model.named_parameters())
    for key, value in state.items():
        assert torch.equal(loaded[key.removeprefix("model.")], value), key


def test_two_processes_evaluate_in_batches_sized_by_length(tmp_path):
    """Evaluation's batch sampler under DDP: mma places the ranks itself, Lightning does not rebuild the loader."""
    command = [sys.executable, "-m", "mma.cli", "test", "--config", TINY, f"--trainer.default_root_dir={tmp_path}"]
    command += ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.init_args.group_by_length=true"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test/all" in done.stdout
