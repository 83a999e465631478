"""The vision-language model: frozen ViT -> visual tokens -> trainable projector -> frozen LLM, adapters attached.

The sequence layout (``mma.layout.SequenceLayout``) is given when the model is made, from the adapter method's
settings; rows are left-padded after the modality slot so that generation appends at the same index for every
row::

    [modality] [pad ...] [BOS] "Image: " [visual tokens] "\\n" prompt [answer EOS]
    [modality] [pad ...] [BOS] "Image: N/A" "\\n" prompt [answer EOS]          (text-only: no ViT pass)

The modality token is attended by no other position, so it changes nothing but the routers that read it.

Under early fusion (LLaMA-Adapter V2, ``visual_in_sequence: false``) the ``"Image: "`` prefix stays, the slots go,
and the visual tokens reach the adapted attention layers as the keyword arguments ``VISUAL_TOKENS`` (B, n_vis, d;
zeros for text-only rows) and ``HAS_IMAGE`` (B,), which transformers passes from the decoder down to every
attention module. With ``class_token_in_sequence`` (ADEM-VL) one slot stays, for the image's class token through a
projector of its own.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from mma.adapters.base import HAS_IMAGE, VISUAL_TOKENS, generation_caches, set_train_mode
from mma.backbones.vision import VisionTower
from mma.errors import ConfigError
from mma.layout import IGNORE_INDEX, SequenceLayout


@dataclass
class VisualConfig:
    """How images become LLM tokens.

    Args:
        tokens: ``cls`` takes the class token after every ``every``-th ViT block, with no final norm (LaVIN: 6 tokens
            from ViT-L/14); ``patches`` takes every patch token of block ``layer``.
        every: block stride for ``cls``.
        layer: the block whose patch tokens ``patches`` takes, indexed as a Python list: -1 the last, as the
            backbone's own output features (with its final norm where it applies one); -2 the penultimate, without
            a norm (LLaVA's choice for CLIP).
        projector_hidden: hidden width of the ``Linear -> SiLU -> Linear`` projector (LaVIN: 128).
        norm: pass the tokens through the backbone's final norm where they have not been (intermediate blocks;
            CLIP's last): DINOv2's ``get_intermediate_layers`` does, and its raw intermediate states are badly
            scaled for a projector (measured on easy-vqa: shape 88% vs 29% after 100 steps). LaVIN reads CLIP's
            raw class tokens: off by default.
    """

    tokens: Literal["cls", "patches"] = "cls"
    every: int = 4
    layer: int = -1
    projector_hidden: int = 128
    norm: bool = False


class Projector(nn.Module):
    """ViT width -> hidden -> LLM width with SiLU; xavier weights, zero biases."""

    part = "projection"

    def __init__(self, vit_dim: int, hidden: int, llm_dim: int, train_source: str | None = None) -> None:
        super().__init__()
        self.train_source = train_source
        self.net = nn.Sequential(nn.Linear(vit_dim, hidden), nn.SiLU(), nn.Linear(hidden, llm_dim))
        for layer in (self.net[0], self.net[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype))


class ModalityEmbedding(nn.Embedding):
    """``Embedding(2, d)``: row 1 for samples with an image, row 0 for text-only samples."""

    part = "modality token"

    def __init__(self, dim: int) -> None:
        super().__init__(2, dim)

    def adapter_params(self) -> list[str]:
        return ["weight"]


class VisionLanguageModel(nn.Module):
    """Frozen backbones plus the trainable glue; adapters attach to ``llm`` and ``vit`` in place.

    ``vit`` is the vision backbone module itself (timm or Hugging Face, unwrapped); ``tower`` is the accessor
    everything else reads it through (``mma.backbones.vision``).
    """

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tower: VisionTower,
        visual: VisualConfig,
        layout: SequenceLayout | None = None,
        projector_source: str | None = None,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.vit = tower.module
        self.tower = tower
        self.tokenizer = tokenizer
        self.visual = visual
        self.layout = layout or SequenceLayout()
        dim = llm.config.hidden_size
        self.projector = Projector(tower.width, visual.projector_hidden, dim, projector_source).to(llm.device)
        self.class_projector = (
            Projector(tower.width, visual.projector_hidden, dim).to(llm.device)
            if self.layout.class_token_in_sequence
            else None
        )
        self.modality_embedding = ModalityEmbedding(dim).to(llm.device) if self.layout.modality_token else None
        self._check_visual_config()

    def _check_visual_config(self) -> None:
        visual, depth = self.visual, len(self.tower.blocks)
        if visual.tokens == "cls" and not self.tower.has_class_token:
            raise ConfigError(f"visual.tokens=cls needs a ViT with a class token ({self.tower.name} has none)")
        if visual.tokens == "cls" and not 1 <= visual.every <= depth:
            raise ConfigError(f"visual.every={visual.every} must be in 1..{depth} (ViT depth)")
        if visual.tokens == "cls" and visual.layer != -1:
            raise ConfigError(f"visual.layer={visual.layer} chooses the block of tokens=patches; cls uses every")
        if self.layout.class_token_in_sequence and visual.tokens != "patches":
            raise ConfigError(
                f"the class token in the sequence goes beside patch tokens, not visual.tokens={visual.tokens}"
            )
        if self.layout.class_token_in_sequence and not self.tower.has_class_token:
            raise ConfigError(
                f"the class token in the sequence needs a ViT with a class token ({self.tower.name} has none)"
            )
        if not -depth <= visual.layer < depth:
            raise ConfigError(f"visual.layer={visual.layer} must be in {-depth}..{depth - 1} (ViT depth {depth})")

    @property
    def sequence_visual_tokens(self) -> int:
        """Visual token slots each image sample has in the LLM sequence (0 under early fusion, 1 with the class
        token in the sequence)."""
        return self.layout.sequence_slots(self.num_visual_tokens)

    @property
    def num_visual_tokens(self) -> int:
        if self.visual.tokens == "cls":
            return len(self.tower.blocks) // self.visual.every
        return self.tower.num_patches()

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        set_train_mode(self, mode)
        return self

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, 3, H, W) -> visual tokens (images, num_visual_tokens, llm_dim) and, when the layout puts it in
        the sequence, the class token through its own projector (images, 1, llm_dim), else None."""
        visual, with_class = self.visual, self.class_projector is not None
        features = self.tower.features(pixel_values, visual.tokens, visual.every, visual.layer, visual.norm, with_class)
        if not with_class:
            return self.projector(features), None
        return self.projector(features[:, 1:]), self.class_projector(features[:, :1])

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, has_image: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token embeddings with the modality token and (unless fused into adapters) the visual tokens written
        into their slots, and the keyword arguments the LLM's layers get.

        input_ids (B, T) holding the layout's image / modality slot placeholders -> (B, T, d), {name: tensor}.
        """
        embeddings = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        layer_inputs = {}
        if pixel_values is not None and pixel_values.shape[0] > 0:
            visual, class_token = self.encode_images(pixel_values)  # (N_img, n_vis, d), (N_img, 1, d) or None
            visual = visual.to(embeddings.dtype)
            in_sequence = visual if self.layout.visual_in_sequence else class_token
            if in_sequence is not None:
                slots = (input_ids == self.layout.image_slot).unsqueeze(-1)
                embeddings = embeddings.masked_scatter(slots, in_sequence.to(embeddings.dtype))
            if not self.layout.visual_in_sequence:
                rows = visual.new_zeros(input_ids.shape[0], *visual.shape[1:]).index_copy(
                    0, has_image.nonzero().flatten(), visual
                )
                layer_inputs = {VISUAL_TOKENS: rows, HAS_IMAGE: has_image}
        if self.modality_embedding is not None:
            modality = self.modality_embedding(has_image.long()).to(embeddings.dtype)  # (B, d)
            is_slot = (input_ids == self.layout.modality_slot).unsqueeze(-1)
            embeddings = torch.where(is_slot, modality[:, None], embeddings)
        return embeddings, layer_inputs

    def attention_mask(self, valid: torch.Tensor, query_length: int | None = None) -> torch.Tensor:
        """Boolean (B, 1, Q, K) mask, True where a query may attend a key.

        Causal over valid keys; no query but the modality token itself sees key 0 when a modality token is in
        use; a padding query sees only itself so no softmax row is empty. ``query_length`` Q < K builds the mask
        of the last Q positions (decoding with a KV cache).
        """
        total = valid.shape[1]
        query_length = query_length or total
        q = torch.arange(total - query_length, total, device=valid.device)[:, None]
        k = torch.arange(total, device=valid.device)[None, :]
        allowed = (k <= q) & valid[:, None, :]  # (B, Q, K)
        if self.layout.modality_token:
            allowed = allowed & ((k != 0) | (q == 0))
        allowed = allowed | (k == q)
        return allowed[:, None]

    def position_ids(self, valid: torch.Tensor) -> torch.Tensor:
        """Positions count valid tokens only, so neither left padding nor the modality slot shifts them; the
        modality token sees only itself, where rotary position has no effect. (B, T) -> (B, T)."""
        counted = valid.clone()
        if self.layout.modality_token:
            counted[:, 0] = False
        return (counted.long().cumsum(-1) - 1).clamp(min=0)

    def hidden_states(
        self, batch: dict, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last-layer hidden states (B, T, d) of the full sequences in ``batch``; the (B, 1, T, T) mask and (B, T)
        positions default to ``attention_mask`` and ``position_ids`` of the batch's valid tokens."""
        valid = batch["attention_mask"].bool()
        embeddings, layer_inputs = self.embed(batch["input_ids"], batch.get("pixel_values"), batch["has_image"])
        out = self.llm.get_decoder()(
            inputs_embeds=embeddings,
            attention_mask=self.attention_mask(valid) if attention_mask is None else attention_mask,
            position_ids=self.position_ids(valid) if position_ids is None else position_ids,
            use_cache=False,
            **layer_inputs,
        )
        return out.last_hidden_state

    def token_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every labelled token and the sample each belongs to: (N,), (N,).

        The LM head runs only on positions that predict a label: on a 135M model with a 49k vocabulary the head
        over every position costs about as much as the rest of the forward pass. A packed batch (``sample_ids``)
        holds several samples per row, each on its own (``packed_attention``); samples are then numbered as the
        collator received them, not by row.
        """
        hidden = self.hidden_states(batch, *self.packed_attention(batch))[:, :-1]  # (B, T-1, d): tokens 1..T-1
        targets = batch["labels"][:, 1:]
        selected = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[selected]).float()  # (N, vocab)
        logprobs = -F.cross_entropy(logits, targets[selected], reduction="none")
        if "sample_ids" in batch:
            return logprobs, batch["sample_ids"][:, 1:][selected] - 1
        rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
        return logprobs, rows[selected]

    def packed_attention(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The block-diagonal (B, 1, T, T) mask and the (B, T) positions of a packed batch: each sample attends
        to itself only and counts positions from 0, as in a row of its own. (None, None) for other batches."""
        if "sample_ids" not in batch:
            return None, None
        valid, samples = batch["attention_mask"].bool(), batch["sample_ids"]  # (B, T) each; samples 0: no sample
        mask = self.attention_mask(valid) & (samples[:, None, :, None] == samples[:, None, None, :])
        _, starts = segment_starts(samples)
        index = torch.arange(samples.shape[1], device=samples.device)
        return mask, torch.where(samples > 0, index - starts, 0)

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of the batch."""
        logprobs, _ = self.token_logprobs(batch)
        return -logprobs.mean()

    def sequence_logprobs(self, batch: dict) -> torch.Tensor:
        """Summed log-probability of each sample's labelled tokens: (B,), or (samples,) when packed."""
        logprobs, rows = self.token_logprobs(batch)
        count = int(batch["sample_ids"].max()) if "sample_ids" in batch else batch["labels"].shape[0]
        return torch.zeros(count, device=logprobs.device).index_add(0, rows, logprobs)

    def option_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every candidate token of a scoring batch and the (sample, option) row it belongs to:
        (N,), (N,), rows numbered as ``batch["sample_index"]`` numbers them.

        A scoring row (``mma.data.collate``) holds a prompt, then each candidate as a segment. A candidate attends
        to the prompt and to itself only and its positions continue from the prompt's end, so each scores as in a
        sequence of its own, while the prompt, its picture and the modality token that LaVIN's routers read go
        through the model once for all candidates. A candidate's first token is predicted from the prompt's last
        position, each later one from the candidate position before it (labelled with it).
        """
        valid, segments = batch["attention_mask"].bool(), batch["segment_ids"]  # (S, T) each
        index = torch.arange(segments.shape[1], device=segments.device)
        first, starts = segment_starts(segments)
        starts_candidate = first & (segments > 0)  # (S, T): the first token of each candidate
        keys, queries = segments[:, None, None, :], segments[:, None, :, None]
        mask = self.attention_mask(valid) & ((keys == 0) | (keys == queries))  # (S, 1, T, T)
        positions = self.position_ids(valid & (segments == 0)) + torch.where(segments > 0, index - starts + 1, 0)
        hidden = self.hidden_states(batch, mask, positions)  # (S, T, d)
        within = batch["labels"] != IGNORE_INDEX  # (S, T): candidate positions that predict a later token
        prompt_last = (segments == 0).sum(dim=1) - 1  # (S,): candidates follow the prompt
        first_rows = starts_candidate.nonzero(as_tuple=True)[0]
        within_rows, within_positions = within.nonzero(as_tuple=True)
        sample = torch.cat([first_rows, within_rows])  # (N,)
        predictors = torch.cat([prompt_last[first_rows], within_positions])
        targets = torch.cat([batch["input_ids"][starts_candidate], batch["labels"][within]])
        logits = self.llm.get_output_embeddings()(hidden[sample, predictors]).float()  # (N, vocab)
        logprobs = -F.cross_entropy(logits, targets, reduction="none")
        options = torch.bincount(batch["sample_index"].to(sample.device), minlength=segments.shape[0])  # (S,)
        first_row = options.cumsum(0) - options  # (S,) row of each sample's first option
        segment = torch.cat([segments[starts_candidate], segments[within]])
        return logprobs, first_row[sample] + segment - 1

    @torch.no_grad()
    def generate(
        self, batch: dict, max_new_tokens: int = 32, use_cache: bool = True, stop_at_eos: bool = True
    ) -> list[list[int]]:
        """Greedy decoding of the prompts in ``batch`` (left-padded, no labels). Returns new token ids per row,
        cut at the first EOS (``stop_at_eos=False`` always decodes ``max_new_tokens`` steps, for benchmarks).

        With ``use_cache`` the prompt is run once and each step feeds one token; routing weights and prompt
        keys/values are computed at prefill and reused. Without it every step re-runs the whole sequence (the
        reference for tests).
        """
        valid = batch["attention_mask"].bool()
        embeddings, layer_inputs = self.embed(batch["input_ids"], batch.get("pixel_values"), batch["has_image"])
        eos = self.tokenizer.eos_token_id
        finished = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
        cache = DynamicCache(config=self.llm.config) if use_cache else None
        new_tokens, step_input, query_length = [], embeddings, None
        with generation_caches(self.llm):
            for _ in range(max_new_tokens):
                out = self.llm(
                    inputs_embeds=step_input,
                    attention_mask=self.attention_mask(valid, query_length),
                    position_ids=self.position_ids(valid)[:, -step_input.shape[1] :],
                    cache=cache,
                    use_cache=use_cache,
                    logits_to_keep=1,
                    **layer_inputs,
                )
                token = out.logits[:, -1].argmax(-1).masked_fill(finished, eos)  # (B,)
                new_tokens.append(token)
                finished |= (token == eos) & stop_at_eos
                if finished.all():
                    break
                token_embedding = self.llm.get_input_embeddings()(token)[:, None].to(embeddings.dtype)
                valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
                embeddings = torch.cat([embeddings, token_embedding], dim=1)
                step_input, query_length = (token_embedding, 1) if use_cache else (embeddings, None)
        tokens = torch.stack(new_tokens, dim=1).tolist()
        return [row[: row.index(eos)] if stop_at_eos and eos in row else row for row in tokens]


def segment_starts(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, T) segment ids whose segments are contiguous runs: whether each position starts a run, and the
    index where its run starts; both (B, T)."""
    index = torch.arange(segments.shape[1], device=segments.device)  # (T,)
    first = segments != F.pad(segments, (1, 0))[:, :-1]
    return first, torch.where(first, index, 0).cummax(dim=1).values
