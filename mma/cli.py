"""The ``mma`` command: LightningCLI's fit / validate / test / predict, plus ``params``, ``demo``, ``export``,
``ask``, ``chat``, ``merge`` and ``sweep``.

Heavy libraries are imported only by the command that runs: ``mma --help``, ``mma --version`` and ``mma <own
command> --help`` answer without loading torch; ``mma fit --help`` (and the other Lightning commands') is cached
(``mma.commands.help_cache``). Default output carries mma's own lines; ``--verbose`` (anywhere on
the line) brings back Lightning's info lines and the warnings listed in ``QUIET_WARNINGS``.
"""

import importlib
import importlib.metadata
import logging
import os
import sys
import warnings

from mma.errors import ConfigError, MMAError

log = logging.getLogger("mma")

# Lightning's commands (LightningCLI, recipes as YAML) and mma's own (``mma.commands.<name>.<name>_command(argv)``).
LIGHTNING_COMMANDS = {
    "fit": "train a recipe's adapters on its frozen backbones",
    "validate": "evaluate a recipe on its validation split",
    "test": "evaluate a recipe on its test split (with --ckpt_path or model.adapter)",
    "predict": "write a recipe's generated answers to predictions.jsonl",
}
SUBCOMMANDS = {
    "params": "trainable and total parameters of a recipe, counted on the meta device",
    "demo": "evaluate, fine-tune and re-evaluate a recipe (default: easy-vqa with DINOv2), print what changed",
    "export": "turn a training checkpoint into a shareable adapter folder",
    "ask": "answer one question with an exported adapter",
    "chat": "a multi-turn conversation with an exported adapter, an optional image, the KV cache kept",
    "merge": "fold an adapter into the LLM's weights as a plain transformers folder",
    "sweep": "run a sweep file's runs one after another and report",
}
# Lines that say nothing about an mma run: tips, device and seed notices, deprecations inside the libraries, and
# warnings about what mma does on purpose (backbones in eval mode; the data module restores the epoch position).
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"LightningCLI's args parameter is intended",
    r".*your dataloader is not resumable",
    r"You are using a custom batch sampler `LengthBudgetBatchSampler` for prediction",  # it drops no sample
)
QUIET_LOGGERS = {
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,  # tips (litlogger, litmodels), GPU/TPU available
    "lightning.fabric.utilities.seed": logging.WARNING,  # "Seed set to 0"
    "bitsandbytes": logging.ERROR,  # "Failed to load CPU gemm_4bit_forward from kernels-community"
}


def usage() -> str:
    """mma's own short help: every command with one line (``mma <command> --help`` has the options)."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *SUBCOMMANDS]))
    lines = ["usage: mma <command> [options]   (mma <command> --help lists a command's options)", ""]
    for title, commands in (("training (Lightning)", LIGHTNING_COMMANDS), ("adapters and runs", SUBCOMMANDS)):
        lines += [f"{title}:", *(f"  {name:<{width}}  {text}" for name, text in commands.items()), ""]
    lines += ["options:", "  --verbose  show Lightning's info lines and library warnings", "  --version  mma's version"]
    return "\n".join(lines)


def quiet() -> None:
    """Silence the lines in ``QUIET_WARNINGS`` and ``QUIET_LOGGERS`` and the Hugging Face progress bars (the GGUF
    loader's, "Loading weights"), set before the libraries load, which is when some of them speak."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader runs a bare tqdm (mma's bars are Rich)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def run(argv: list[str]) -> None:
    """Dispatch to mma's own command or to LightningCLI; an unknown command is refused with the list."""
    command = argv[0]
    if command in SUBCOMMANDS:
        getattr(importlib.import_module(f"mma.commands.{command}"), f"{command}_command")(argv[1:])
    elif command in LIGHTNING_COMMANDS and argv[1:] in (["--help"], ["-h"]):
        from mma.commands.help_cache import lightning_help

        print(lightning_help(command), end="")
    elif command in LIGHTNING_COMMANDS or command.startswith("-"):  # `mma -c RECIPE fit`: LightningCLI's form
        from mma.recipe import MMACLI

        MMACLI(args=argv)
    else:
        commands = ", ".join([*LIGHTNING_COMMANDS, *SUBCOMMANDS])
        raise ConfigError(f"unknown command {command!r}; commands: {commands} (see mma --help)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning").propagate = False  # it has a handler of its own: each line once
    warnings.filterwarnings("ignore", message=QUIET_WARNINGS[0])  # frozen backbones stay in eval mode on purpose
    if not verbose:
        quiet()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] == "--version":
        print(f"mma {importlib.metadata.version('mma')}")
        return
    try:
        run(argv)
    except MMAError as err:
        print(f"mma: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
