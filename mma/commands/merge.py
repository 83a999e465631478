"""``mma merge --adapter DIR --out OUT [--modality text|image]``: fold an adapter into the LLM's weights and write
a standard Hugging Face model folder (weights, config, tokenizer) that plain ``transformers`` loads.

The folder holds the LLM alone (ViT and projector are not part of a causal LM). LaVIN adapters are folded for one
modality: ``text`` reproduces the adapted model on text-only prompts. The write is atomic, like ``mma export``.
"""

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def merge_to_folder(
    adapter: Path, out: Path, modality: str | None = None, ignore_fingerprint: bool = False, overwrite: bool = False
) -> Path:
    """Load the adapter onto its backbones, fold it into the LLM and save the LLM and tokenizer to ``out``."""
    # Imported here: `mma merge --help` answers without loading torch.
    from mma.checkpoint import check_replaceable, load_model, write_folder_atomically
    from mma.merge import merge_adapter

    check_replaceable(out, overwrite)
    model, config = load_model(adapter, ignore_fingerprint)
    llm = merge_adapter(model, config.adapter, modality)

    def write(folder: Path) -> None:
        llm.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)

    return write_folder_atomically(out, write, overwrite, writer="mma merge")


def merge_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma merge", description=__doc__)
    parser.add_argument("--adapter", required=True, help="adapter folder written by mma export")
    parser.add_argument("--out", required=True, help="model folder to write (must not exist)")
    parser.add_argument("--modality", choices=("text", "image"), help="LaVIN: the modality to fold the routers for")
    parser.add_argument("--ignore-fingerprint", action="store_true", help="load onto other backbones anyway")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder an earlier merge or export wrote")
    args = parser.parse_args(argv)
    out = merge_to_folder(Path(args.adapter), Path(args.out), args.modality, args.ignore_fingerprint, args.overwrite)
    log.info("merged model written to %s", out)
