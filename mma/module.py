"""The LightningModule: owns the model, trains only adapter parameters, evaluates by scoring answer options."""

import random
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from timm.data import create_transform
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from mma.adapters.base import source_parameters
from mma.build import ModelConfig, build_model, model_config_dict
from mma.checkpoint import AdapterSource, load_adapter, load_parts, non_finite
from mma.data.base import Evaluation, MMADataModule
from mma.data.collate import VLMCollator
from mma.errors import ConfigError, DataError, TrainingDiverged
from mma.evaluate import REPORTS, parse_answer, resolve_unparseable
from mma.metrics import NORMALISATIONS, GroupedAccuracy, chance_of, choices_by_normalisation
from mma.model import VisionLanguageModel
from mma.optim import OptimizerConfig, make_optimizer, warmup_cosine


def compiled_loss(model: VisionLanguageModel) -> Callable[[dict], torch.Tensor]:
    """``model.loss`` through ``torch.compile`` (inductor, dynamic shapes), fed the batch's tensors only: ids and
    sources as Python values would be baked into the graph and recompile it every batch."""
    loss = torch.compile(model.loss, dynamic=True)
    return lambda batch: loss({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})


class MMAModule(L.LightningModule):
    """Frozen backbones + one adapter method, trained on answer tokens.

    Args:
        model: backbones, visual tokens and the adapter method.
        optimizer: AdamW and schedule settings.
        max_length: longest token sequence; longer samples are cut at the end.
        activation_checkpointing: recompute LLM and ViT block activations in backward to save memory.
        max_new_tokens: generation length for ``predict`` and generation-based evaluation.
        image_transform: overrides of the ViT's own data config for the image transform (timm
            ``resolve_data_config`` keys: ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``input_size``).
        adapter: an exported adapter folder (``mma export``) loaded onto the model once it is built.
        init_from: an exported adapter folder whose projector starts this run (stage 2 of a two-stage run starts
            from stage 1's aligned projector, whatever method trained it); backbones other than its own are refused.
        compile: run the training loss through ``torch.compile`` (inductor, dynamic shapes; the first steps
            compile). The model is not wrapped: checkpoints, resume, evaluation and generation stay eager.
    """

    def __init__(
        self,
        model: ModelConfig,
        optimizer: OptimizerConfig | None = None,
        max_length: int = 512,
        activation_checkpointing: bool = False,
        max_new_tokens: int = 32,
        image_transform: dict | None = None,
        adapter: AdapterSource | None = None,
        init_from: str | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("max_length", max_length), ("max_new_tokens", max_new_tokens)):
            if value < 1:
                raise ConfigError(f"model setting {name}={value} must be at least 1")
        self.model_config = model
        self.adapter_source = adapter
        self.optimizer_config = optimizer or OptimizerConfig()
        # Plain data only: Lightning reads checkpoints with ``weights_only=True``, which refuses pickled classes.
        self.save_hyperparameters(
            {
                "model": model_config_dict(self.model_config),
                "optimizer": asdict(self.optimizer_config),
                "max_length": max_length,
                "activation_checkpointing": activation_checkpointing,
                "max_new_tokens": max_new_tokens,
                "image_transform": image_transform or {},
                "adapter": asdict(adapter) if adapter else None,
                "init_from": init_from,
                "compile": compile,
            }
        )
        self.model: VisionLanguageModel | None = None
        # Checkpoints hold only the trainable weights; ``on_load_checkpoint`` checks their keys exactly instead.
        self.strict_loading = False
        self._backward_inputs: list[torch.nn.Parameter] | None = None
        self._compiled_loss = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = build_model(self.model_config)
        if self.hparams.init_from is not None:
            load_parts(self.model, self.hparams.init_from, ("projector",), self.model_config)
        if self.adapter_source is not None:
            source = self.adapter_source
            load_adapter(self.model, source.path, self.model_config, source.ignore_fingerprint)
        if self.hparams.activation_checkpointing:
            wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            blocks = LlamaDecoderLayer | self.model.tower.block_class
            apply_activation_checkpointing(
                self.model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, blocks)
            )

    def image_data_config(self) -> dict:
        """The ViT's own preprocessing (size, interpolation, mean/std) with the recipe's overrides on top."""
        self.configure_model()
        return self.model.tower.data_config(self.hparams.image_transform)

    def make_collator(self) -> VLMCollator:
        """The collator of this model: its tokenizer, sequence layout, visual token count and image transform."""
        self.configure_model()
        return VLMCollator(
            self.model.tokenizer,
            transform=create_transform(**self.image_data_config()),
            layout=self.model.layout,
            num_visual_tokens=self.model.num_visual_tokens,
            max_length=self.hparams.max_length,
        )

    def setup(self, stage: str) -> None:
        """Hand the data module the model's collator and take its evaluation description (one way: the data layer
        never reaches back into the module)."""
        data = self.trainer.datamodule
        if not isinstance(data, MMADataModule):
            raise ConfigError(f"the data module must extend mma.data.MMADataModule, got {type(data).__name__}")
        data.set_collator(self.make_collator())
        self.evaluation: Evaluation = data.evaluation()
        self.fallback_rng = random.Random(self.evaluation.seed)
        groups = self.evaluation.groups
        self.val_accuracy = GroupedAccuracy(groups)
        names = self.evaluation.test_names
        self.test_accuracy = torch.nn.ModuleList(GroupedAccuracy(groups) for _ in names)
        self.test_chance = torch.nn.ModuleList(GroupedAccuracy(groups) for _ in names)  # mean of 1 / options
        # Overall accuracy under every option-score normalisation ("Avg@sum", ...), from the same forward pass.
        by_normalisation = [f"{self.evaluation.headline}@{name}" for name in NORMALISATIONS]
        self.test_by_normalisation = torch.nn.ModuleList(GroupedAccuracy(by_normalisation) for _ in names)
        if isinstance(self.trainer.strategy, DDPStrategy):
            # A process whose batch is all text-only runs no ViT, so the ViT adapters and the projector get no
            # gradient there, and DDP that does not look for unused parameters waits for them forever. Lightning
            # wraps the model after this hook; an explicit ``find_unused_parameters`` in the recipe is kept.
            self.trainer.strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    def on_train_start(self) -> None:
        # Lightning keeps the modes it finds; adapters must train (dropout on) while backbones stay in eval.
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._backward_inputs = self._source_parameters(batch)
        loss = self._training_loss(batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.global_step} (batch {batch_idx}); the run stops here and "
                "the last saved checkpoint is kept"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _training_loss(self, batch: dict) -> torch.Tensor:
        """The model's loss, compiled (``compiled_loss``) when asked."""
        if not self.hparams.compile:
            return self.model.loss(batch)
        if self._compiled_loss is None:
            self._compiled_loss = compiled_loss(self.model)
        return self._compiled_loss(batch)

    def _source_parameters(self, batch: dict) -> list[torch.nn.Parameter] | None:
        """Joint training: the parameters a batch from one data source trains; None (all) for unlabelled data."""
        if "source" not in batch:
            return None
        sources = set(batch["source"])
        if len(sources) != 1:
            raise DataError(
                f"a training batch mixes data sources {sorted(sources)}; joint training needs one per batch"
            )
        source = sources.pop()
        params = source_parameters(self.model, source)
        if not params:
            raise ConfigError(f"no trainable parameter learns from {source!r} batches with this adapter")
        return params

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Gradients flow only into the batch source's parameters (joint training); others keep ``grad=None``,
        so the optimizer leaves them alone, weight decay included."""
        inputs, self._backward_inputs = self._backward_inputs, None
        if inputs is None:
            super().backward(loss, *args, **kwargs)
        else:
            loss.backward(*args, inputs=inputs, **kwargs)

    def _choose(self, batch: dict) -> tuple[torch.Tensor, list[str | None], dict[str, torch.Tensor]]:
        """Chosen option per sample (-1: none), the generated text (None when options are scored) and, when
        scored, the choice under every normalisation.

        Batches with ``candidates`` are scored by log-likelihood, normalised as the data module's
        ``score_normalisation`` says (``sum`` without one); others are answered by greedy generation and parsed
        for ``The answer is X``; an unparseable answer follows the data module's ``unparseable`` policy.
        """
        if "sample_index" in batch:
            chosen = self._score_options(batch)
            return chosen[self.evaluation.score_normalisation], [None] * len(batch["target"]), chosen
        texts = self._generated_texts(batch)
        policy, rng = self.evaluation.unparseable, self.fallback_rng
        parsed = [parse_answer(text, choices) for text, choices in zip(texts, batch["choices"], strict=True)]
        self._unparseable += sum(p is None for p in parsed)
        chosen = [resolve_unparseable(p, len(c), policy, rng) for p, c in zip(parsed, batch["choices"], strict=True)]
        return torch.tensor(chosen), texts, {}

    def _generated_texts(self, batch: dict) -> list[str]:
        """Greedy answers to the batch's prompts, each read with the evaluation's answer prefix in front."""
        prefix = self.evaluation.answer_prefix
        tokens = self.model.generate(self._with_answer_prefix(batch), max_new_tokens=self.hparams.max_new_tokens)
        return [prefix + text for text in self.model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def _with_answer_prefix(self, batch: dict) -> dict:
        """The generation batch with the evaluation's answer prefix after every (left-padded) prompt, tokenised
        as the start of a training answer is: after the layout's answer separator."""
        if not self.evaluation.answer_prefix:
            return batch
        text = self.model.layout.answer_separator + self.evaluation.answer_prefix
        prefix = self.model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prefix = prefix.to(ids.device).expand(ids.shape[0], -1)  # (B, k)
        return {
            **batch,
            "input_ids": torch.cat([ids, prefix], 1),
            "attention_mask": F.pad(mask, (0, prefix.shape[1]), value=1),
        }

    def _score_options(self, batch: dict) -> dict[str, torch.Tensor]:
        """Chosen option per sample under each normalisation of the options' log-likelihoods: name -> (S,).

        The batch has the collator's scoring layout: each prompt runs once, its options are scored from it."""
        logprobs, rows = self.model.option_logprobs(batch)
        sample_index, chars = batch["sample_index"].cpu(), batch["option_chars"].cpu()
        return choices_by_normalisation(logprobs.float().cpu(), rows.cpu(), sample_index, chars)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        chosen, _, _ = self._choose(batch)
        self.val_accuracy.update(chosen == torch.tensor(batch["target"]), batch["groups"])

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_accuracy.compute().items()}, prog_bar=False)
        self.log("val/acc", self.val_accuracy.compute()[self.evaluation.headline], prog_bar=True)
        self.val_accuracy.reset()

    def on_validation_epoch_start(self) -> None:
        self._unparseable = 0

    def on_test_epoch_start(self) -> None:
        self._unparseable = 0
        self._records = [[] for _ in self.evaluation.test_names]

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        chosen, texts, by_normalisation = self._choose(batch)
        target = torch.tensor(batch["target"])
        self.test_accuracy[dataloader_idx].update(chosen == target, batch["groups"])
        self.test_chance[dataloader_idx].update(chance_of(batch), batch["groups"])
        for name, choice in by_normalisation.items():
            group = [f"{self.evaluation.headline}@{name}"]
            self.test_by_normalisation[dataloader_idx].update(choice == target, [group] * len(choice))
        pids = batch.get("pid", [f"{batch_idx}:{i}" for i in range(len(texts))])
        self._records[dataloader_idx] += [
            {"pid": pid, "predicted": int(c), "text": t} for pid, c, t in zip(pids, chosen, texts, strict=True)
        ]

    def on_test_epoch_end(self) -> None:
        self.log("test/unparseable", float(self._unparseable), add_dataloader_idx=False)
        evaluation = self.evaluation
        report = REPORTS[evaluation.report] if evaluation.report else None
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        per_test = (self.test_accuracy, self.test_chance, self.test_by_normalisation, self._records)
        metrics = zip(evaluation.test_names, *per_test, strict=True)
        for name, metric, chance, normalised, records in metrics:
            scores = {k: float(v) for k, v in metric.compute().items()}
            scores |= {f"chance/{k}": float(v) for k, v in chance.compute().items()}
            if normalised.update_called:  # options were scored
                scores |= {k: float(v) for k, v in normalised.compute().items()}
            self.log_dict({f"{name}/{k}": v for k, v in scores.items()}, add_dataloader_idx=False)
            if report is not None and self.trainer.is_global_zero:
                report(name, records, scores, self._unparseable, evaluation, folder)
            for each in (metric, chance, normalised):
                each.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy answers, one dict per sample with the generated text and the sample's own fields."""
        texts = self._generated_texts(batch)
        passthrough = {k: v for k, v in batch.items() if isinstance(v, list)}
        return [{**{k: v[i] for k, v in passthrough.items()}, "generated": text} for i, text in enumerate(texts)]

    def configure_optimizers(self) -> dict:
        cfg = self.optimizer_config
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = make_optimizer(groups, cfg, self.device)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(cfg.warmup_fraction * total))
        schedule = partial(warmup_cosine, warmup=warmup, total=total, min_ratio=cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_state_keys(self) -> set[str]:
        """State-dict names of the trainable parameters (activation-checkpoint wrappers leave no trace there)."""
        return {name.replace(_CHECKPOINT_PREFIX, "") for name, p in self.named_parameters() if p.requires_grad}

    def optimizer_step(self, *args, **kwargs) -> None:
        """Stop at the step that leaves a trainable weight non-finite, before any callback can save it (a
        finite loss can still give a step that breaks the weights; the next loss would be checked too late)."""
        super().optimizer_step(*args, **kwargs)  # ``global_step`` counts it only once this hook returns
        trainable = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if bad := non_finite(trainable):
            raise TrainingDiverged(
                f"optimizer step {self.global_step + 1} left {len(bad)} trainable tensor(s) non-finite "
                f"({bad[0]}, ...); the run stops here and the last saved checkpoint is kept"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights: a few MB instead of the backbones' GB; never a non-finite one."""
        keys = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        if bad := non_finite(checkpoint["state_dict"]):
            raise TrainingDiverged(
                f"refusing to save a checkpoint at step {self.global_step}: {len(bad)} trainable tensor(s) are "
                f"non-finite ({bad[0]}, ...); the run stops here and the last saved checkpoint is kept"
            )
        checkpoint["rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Every trainable weight must be in the checkpoint and nothing else: a wrong recipe fails loudly."""
        self.configure_model()
        expected, found = self.trainable_state_keys(), set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint does not match this model's adapters: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        if "rng_state" in checkpoint:  # adapter dropout continues the uninterrupted run's random stream
            torch.set_rng_state(checkpoint["rng_state"])
