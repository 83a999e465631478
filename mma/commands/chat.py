"""``mma chat --adapter DIR [--image PATH] [--script FILE]``: a conversation with an adapted model, turn by turn.

Type a message and the answer is printed as it is generated; the session keeps its KV cache, so a turn encodes only
its own new text. ``/image PATH`` shows a picture and starts a new conversation about it (the picture sits at the
start of the sequence), ``/reset`` starts over with the same picture, ``/quit`` ends. ``--script FILE`` reads the
turns (and commands), one a line, instead of the keyboard. The template is the one the adapter was trained with
unless ``--template`` says otherwise.
"""

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a session starts: `mma chat --help` answers without loading torch
    from mma.chat import ChatSession
from mma.errors import MMAError


def converse(session: "ChatSession", lines: Iterable[str], write: Callable[[str], None]) -> list[str]:
    """Run ``lines`` (user turns and ``/`` commands) through ``session``, writing each answer as it comes; returns
    the answers."""
    answers = []
    for line in (line.strip() for line in lines):
        try:
            if line == "/quit":
                break
            if line == "/reset":
                session.reset(session.image)
            elif line.startswith("/image "):
                from mma.data.images import load_image

                session.reset(load_image(Path(line.removeprefix("/image ").strip())))
            elif line.startswith("/"):
                print(f"unknown command {line.split()[0]}: /image PATH, /reset, /quit", file=sys.stderr)
            elif line:
                answers.append(session.ask(line, on_text=write))
                write("\n")
        except MMAError as err:  # a bad picture path should not end the conversation
            print(f"mma: error: {err}", file=sys.stderr)
    return answers


def keyboard() -> Iterator[str]:
    """Lines typed after a ``you>`` prompt, until end of input."""
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


def chat_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma chat", description=__doc__)
    parser.add_argument("--adapter", required=True, help="adapter folder written by mma export")
    parser.add_argument("--image", help="picture the conversation starts with (optional)")
    parser.add_argument("--script", help="file of turns, one a line, instead of the keyboard")
    parser.add_argument("--template", choices=("chat", "plain", "caption"), help="override the trained template")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default: %(default)s)")
    parser.add_argument("--ignore-fingerprint", action="store_true", help="load onto other backbones anyway")
    args = parser.parse_args(argv)
    from mma.chat import load_chat
    from mma.data.images import load_image

    session = load_chat(Path(args.adapter), args.template, args.max_new_tokens, args.ignore_fingerprint)
    if args.image:
        session.reset(load_image(Path(args.image)))
    lines = Path(args.script).read_text().splitlines() if args.script else keyboard()
    converse(session, lines, lambda text: print(text, end="", flush=True))
