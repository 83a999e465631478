"""Shared adapter folders: bit-exact round trips, refusals that name what is wrong, no pickle, atomic writes."""

import dataclasses
import json
import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLM, collator_for, perturb, tiny_config, tiny_model, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file

from mma.adapters import registered_adapters
from mma.backbones import load_llm, load_vit
from mma.build import build_model
from mma.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WRITTEN_MARKER,
    AdapterSource,
    adapter_weights,
    file_sha256,
    load_adapter,
    load_model,
    save_adapter,
)
from mma.cli import main
from mma.commands.export import run_metrics
from mma.data import SyntheticVQADataModule
from mma.errors import AdapterError, BackboneMismatch, ConfigError
from mma.fingerprint import parameters_fingerprint
from mma.module import MMAModule, OptimizerConfig
from mma.recipe import config_cli


def _exported(tmp_path, name: str = "lavin", **adapter_config):
    """A perturbed tiny model (backbone seed 0) and the folder it was exported to."""
    model = tiny_model(name, seed=0, **adapter_config)
    perturb(model)
    return model, save_adapter(model, tiny_config(name, **adapter_config), tmp_path / "adapter")


@pytest.mark.parametrize("name", registered_adapters())
def test_round_trip_gives_identical_weights_and_logits(name, tmp_path, samples):
    model, folder = _exported(tmp_path, name)
    fresh = tiny_model(name, seed=7)  # same backbones, other trainable init
    before = adapter_weights(fresh)
    assert any(not torch.equal(before[k], v) for k, v in adapter_weights(model).items())
    load_adapter(fresh, folder, tiny_config(name))
    for key, value in adapter_weights(model).items():
        assert torch.equal(adapter_weights(fresh)[key], value), key
    batch = collator_for(model)(samples)
    assert torch.equal(fresh.token_logprobs(batch)[0], model.token_logprobs(batch)[0])


def test_fingerprint_is_the_bare_backbones(tmp_path):
    """Adapter parameters and ``AdaptedNorm`` wrapping leave the fingerprint unchanged."""
    model, folder = _exported(tmp_path)
    config = tiny_config()
    bare_llm, _ = load_llm(config.llm)
    assert parameters_fingerprint(model.llm) == parameters_fingerprint(bare_llm)
    assert parameters_fingerprint(model.vit) == parameters_fingerprint(load_vit(config.vit))
    saved = json.loads((folder / CONFIG_FILE).read_text())
    assert saved["backbones"]["llm"]["fingerprint"] == parameters_fingerprint(bare_llm)
    assert saved["model"]["adapter"]["class_path"] == "mma.adapters.lavin.LaVIN"
    assert saved["model"]["adapter"]["init_args"]["temperature"] == 10.0  # defaults written out in full


def _other_backbone(kind: str):
    config = tiny_config()
    if kind == "llm weights":
        config.llm = dataclasses.replace(config.llm, seed=1)
    elif kind == "llm config":
        config.llm = dataclasses.replace(config.llm, config={**TINY_LLM, "intermediate_size": 96})
    else:
        config.vit = dataclasses.replace(config.vit, seed=1)
    return config


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "llm weights",
            r"llm: trained on 'random-weight custom LLM \(seed 0.*this model has .*seed 1.*different weights",
        ),
        ("llm config", r"llm: trained on .* a different architecture or dtype"),
        ("vit weights", r"vit: trained on 'vit_tiny_patch16_224 \(random weights, seed 0.*seed 1.*different weights"),
    ],
    ids=["llm-weights", "llm-config", "vit-weights"],
)
def test_other_backbones_are_refused_unless_overridden(kind, message, tmp_path):
    model, folder = _exported(tmp_path)
    config = _other_backbone(kind)
    other = build_model(config)
    with pytest.raises(BackboneMismatch, match=message):
        load_adapter(other, folder, config)
    load_adapter(other, folder, config, ignore_fingerprint=True)
    assert all(torch.equal(adapter_weights(other)[k], v) for k, v in adapter_weights(model).items())


def test_mismatch_without_a_config_names_the_model_classes(tmp_path):
    _, folder = _exported(tmp_path)
    other = build_model(_other_backbone("llm weights"))
    with pytest.raises(
        BackboneMismatch,
        match=r"this model has 'LlamaForCausalLM' \(structure .*\): the same architecture with different",
    ):
        load_adapter(other, folder)


def _rewrite_weights(folder, change) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_FILE)


def test_missing_extra_or_reshaped_tensor_is_named(tmp_path):
    _, folder = _exported(tmp_path)
    name = "llm.model.layers.1.input_layernorm.adapter.router.weight"
    _rewrite_weights(folder, lambda t: t.pop(name))
    with pytest.raises(AdapterError, match=rf"missing tensors \[{name}\]; unexpected tensors \[none\]"):
        load_adapter(tiny_model(), folder)
    _rewrite_weights(folder, lambda t: t.update({name: torch.zeros(2, 64), "lm_head.lora_A": torch.zeros(1)}))
    with pytest.raises(AdapterError, match=r"missing tensors \[none\]; unexpected tensors \[lm_head.lora_A\]"):
        load_adapter(tiny_model(), folder, ignore_fingerprint=True)  # the override never skips the key check
    _rewrite_weights(folder, lambda t: t.update({name: torch.zeros(3, 64)}) or t.pop("lm_head.lora_A"))
    with pytest.raises(
        AdapterError, match=rf"shapes differ from this model's: \[{name} \[3, 64\] \(model: \[2, 64\]\)"
    ):
        load_adapter(tiny_model(), folder)


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "truncated or corrupted"),
        (_garble_header, "header is not JSON"),
        (_flip_last_byte, "is corrupted or was changed after export"),
    ],
    ids=["truncated", "garbled-header", "flipped-data-byte"],
)
def test_damaged_weights_fail_cleanly(damage, message, tmp_path):
    _, folder = _exported(tmp_path)
    damage(folder / WEIGHTS_FILE)
    fresh = tiny_model(seed=7)
    before = adapter_weights(fresh)
    with pytest.raises(AdapterError, match=message):
        load_adapter(fresh, folder)
    assert all(torch.equal(adapter_weights(fresh)[k], v) for k, v in before.items())  # nothing half-loaded


def test_non_finite_weights_are_never_saved_loaded_or_exported(tmp_path, capsys):
    model, folder = _exported(tmp_path)
    name = "projector.net.0.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("inf")
    with pytest.raises(AdapterError, match=rf"holds non-finite values \(NaN or inf\) in 1 tensor\(s\): \[{name}\]"):
        save_adapter(model, tiny_config(), tmp_path / "broken")
    _rewrite_weights(folder, lambda t: t[name].fill_(float("nan")))
    saved = json.loads((folder / CONFIG_FILE).read_text())
    saved["weights"]["sha256"] = file_sha256(folder / WEIGHTS_FILE)  # a consistent folder, NaN and all
    (folder / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_FILE} holds non-finite values"):
        load_adapter(tiny_model(), folder)
    _, ckpt = _trained_checkpoint(tmp_path / "run")
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"][f"model.{name}"].fill_(float("nan"))
    torch.save(checkpoint, ckpt)
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds non-finite values (NaN or inf) in 1 tensor(s): [{name}]" in err
    assert not (tmp_path / "exported").exists()


class _Payload:
    """Unpickling this creates ``marker``: the side effect a malicious file would have."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _pickles(tmp_path, marker) -> list:
    raw, zipped = pickle.dumps(_Payload(marker)), tmp_path / "zipped.pt"
    torch.save({"weight": _Payload(marker)}, zipped)
    (tmp_path / "adapter.pt").write_bytes(raw)
    (tmp_path / "peft_style").mkdir()
    (tmp_path / "peft_style" / "adapter_model.bin").write_bytes(raw)
    _, disguised = _exported(tmp_path)  # a valid folder whose weights file is replaced by a pickle
    (disguised / WEIGHTS_FILE).write_bytes(zipped.read_bytes())
    return [tmp_path / "adapter.pt", zipped, tmp_path / "peft_style", disguised]


def test_pickle_files_are_refused_without_being_unpickled(tmp_path, capsys):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()  # the payload does run when unpickled
    marker = tmp_path / "marker"
    for path in _pickles(tmp_path, marker):
        with pytest.raises(AdapterError, match="it is a pickle file.*convert it once"):
            load_adapter(tiny_model(), path)
    with pytest.raises(SystemExit):
        main(["ask", "--adapter", str(tmp_path / "adapter.pt"), "Hello?"])
    assert "mma: error: refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_interrupted_export_leaves_no_loadable_folder(tmp_path, monkeypatch):
    model, folder = _exported(tmp_path)
    previous = adapter_weights(model)
    perturb(model, seed=2)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mma.checkpoint.adapter_card", interrupt)  # dies after the weights file is written
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tiny_config(), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(AdapterError, match="is not an adapter folder"):
        load_adapter(tiny_model(), tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tiny_config(), folder, overwrite=True)
    monkeypatch.undo()
    renames = []

    def replace_then_die(source, target) -> None:  # dies between moving the old folder away and the new one in
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt
        os.rename(source, target)

    monkeypatch.setattr("mma.checkpoint.os.replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tiny_config(), folder, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    fresh = tiny_model(seed=7)
    load_adapter(fresh, folder)  # the earlier export is intact
    assert all(torch.equal(adapter_weights(fresh)[k], v) for k, v in previous.items())


def test_other_adapter_settings_are_named(tmp_path):
    _, folder = _exported(tmp_path)
    module = MMAModule(tiny_config(temperature=5.0), adapter=AdapterSource(str(folder)))
    with pytest.raises(AdapterError, match="adapter.temperature: adapter 10.0, model 5.0"):
        module.configure_model()


def _trained_checkpoint(tmp_path) -> tuple[MMAModule, object]:
    """Two training steps with the CSV logger and a checkpoint, as ``mma fit`` leaves them."""
    L.seed_everything(0, verbose=False)
    module = MMAModule(tiny_config(), OptimizerConfig(lr=1e-2), max_length=192)
    data = SyntheticVQADataModule(train_size=8, image_size=32, batch_size=4)
    trainer = tiny_trainer(
        max_steps=2,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(save_last=True)],
    )
    trainer.fit(module, datamodule=data)
    return module, next(tmp_path.rglob("last.ckpt"))


def test_export_from_a_training_checkpoint_and_load_in_the_module(tmp_path):
    module, ckpt = _trained_checkpoint(tmp_path)
    out = tmp_path / "exported"
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--license", "apache-2.0"])
    assert sorted(p.name for p in out.iterdir()) == [WRITTEN_MARKER, "README.md", CONFIG_FILE, WEIGHTS_FILE]
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "| train/loss |" in card and "2 optimizer steps" in card
    assert "5,624" in card  # trainable parameters of the tiny LaVIN model
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["training"]["data"]["batch_size"] == 4 and saved["prompt_format"]["max_length"] == 192
    assert saved["training"]["metrics"]["train/loss"]["step"] == 1
    loaded = MMAModule(tiny_config(), adapter=AdapterSource(str(out)))
    loaded.configure_model()
    for key, value in adapter_weights(module.model).items():
        assert torch.equal(adapter_weights(loaded.model)[key], value), key


def test_overwrite_replaces_an_earlier_export_but_never_a_folder_of_other_files(tmp_path, capsys):
    _, ckpt = _trained_checkpoint(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(ckpt), "--out", str(mine), "--overwrite"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"refusing to overwrite {mine}: it holds files that mma did not write" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "exported"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    (out / "README.md").write_text("an earlier card")
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--overwrite"])
    assert (out / "README.md").read_text() != "an earlier card"
    assert json.loads((out / WRITTEN_MARKER).read_text())["written_by"] == "mma.checkpoint.save_adapter"


def test_overwrite_takes_an_empty_folder_and_refuses_a_file(tmp_path):
    model = tiny_model()
    (tmp_path / "empty").mkdir()
    save_adapter(model, tiny_config(), tmp_path / "empty", overwrite=True)
    assert (tmp_path / "empty" / WEIGHTS_FILE).is_file()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        save_adapter(model, tiny_config(), tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"


def test_card_metrics_stop_at_the_checkpoint_step(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.csv").write_text("epoch,step,test/all,train/loss\n0,0,0.3,\n0,4,,1.5\n0,5,,1.2\n1,9,0.8,0.4\n")
    metrics = run_metrics(tmp_path / "checkpoints" / "step=5.ckpt", global_step=5)
    assert metrics == {"test/all": {"value": 0.3, "step": 0}, "train/loss": {"value": 1.2, "step": 5}}


def test_recipes_take_an_adapter_folder():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    overrides = ["--model.adapter.path", "shared/x", "--model.adapter.ignore_fingerprint", "true"]
    module = config_cli(str(recipe), overrides).model
    assert module.adapter_source == AdapterSource("shared/x", ignore_fingerprint=True)
    assert module.hparams.adapter == {"path": "shared/x", "ignore_fingerprint": True}


def test_load_model_rebuilds_the_backbones_from_the_folder(tmp_path):
    model, folder = _exported(tmp_path, hidden=4, temperature=5.0)
    rebuilt, config = load_model(folder)
    assert config.adapter.hidden == 4 and config.adapter.temperature == 5.0
    assert torch.equal(rebuilt.llm.model.embed_tokens.weight, model.llm.model.embed_tokens.weight)
    assert all(torch.equal(adapter_weights(rebuilt)[k], v) for k, v in adapter_weights(model).items())


@pytest.mark.parametrize("with_image", [False, True])
def test_ask_answers_as_the_adapted_model_does(with_image, tmp_path, capsys, blank_image):
    module = MMAModule(tiny_config())
    module.configure_model()
    perturb(module.model, seed=4)
    folder = save_adapter(module.model, tiny_config(), tmp_path / "adapter")
    picture = tmp_path / "picture.png"
    blank_image.save(picture)
    sample = {"prompt": "What colour is it?", "image": blank_image if with_image else None, "answer": None}
    tokens = module.model.generate(module.make_collator()([sample]), max_new_tokens=6)[0]
    assert tokens
    expected = module.model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    image_args = ["--image", str(picture)] if with_image else []
    main(["ask", "--adapter", str(folder), *image_args, "--max-new-tokens", "6", "What colour is it?"])
    assert capsys.readouterr().out == expected + "\n"
