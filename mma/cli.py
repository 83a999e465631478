"""The ``mma`` command: LightningCLI's fit / validate / test / predict, plus ``params``, ``demo``, ``export``,
``ask``, ``chat``, ``merge`` and ``sweep``. Heavy libraries are imported only by the command that runs."""

import importlib
import logging
import sys
import warnings

from mma.errors import MMAError

log = logging.getLogger("mma")

# Subcommands beyond LightningCLI's own; each is ``mma.commands.<name>.<name>_command(argv)``.
SUBCOMMANDS = ("params", "demo", "export", "ask", "chat", "merge", "sweep")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Frozen backbones stay in eval mode on purpose; Lightning warns about that at every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    try:
        if argv and argv[0] in SUBCOMMANDS:
            # Imported on demand: `mma params` should not pay for loading the sweep or merge machinery.
            getattr(importlib.import_module(f"mma.commands.{argv[0]}"), f"{argv[0]}_command")(argv[1:])
        else:
            from mma.recipe import MMACLI

            MMACLI(args=argv)
    except MMAError as err:
        print(f"mma: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
