"""``mma ask --adapter DIR [--image PATH] "question"``: load a shared adapter onto its backbones, print the answer.

The adapter's ``adapter_config.json`` names the backbones and the settings; the backbones are loaded from there
(and must match the adapter's fingerprints). ``--choices`` lays the question out as the multiple-choice prompt
mma's tasks train on; without it the text is the whole prompt.
"""

import argparse
from pathlib import Path


def ask(
    adapter: Path,
    question: str,
    image: Path | None = None,
    choices: list[str] | None = None,
    max_new_tokens: int = 32,
    ignore_fingerprint: bool = False,
) -> str:
    """Greedy answer of the adapted model to one question, with or without a picture."""
    # Imported here: `mma ask --help` answers without loading torch.
    from mma.checkpoint import AdapterSource, read_adapter_config, saved_model_config
    from mma.data.images import load_image
    from mma.data.prompts import question_prompt
    from mma.module import MMAModule

    saved = read_adapter_config(adapter)
    module = MMAModule(
        saved_model_config(saved, adapter),
        max_length=saved["prompt_format"]["max_length"],
        adapter=AdapterSource(str(adapter), ignore_fingerprint),
    )
    module.configure_model()
    prompt = question_prompt(question, choices) if choices else question
    sample = {"prompt": prompt, "image": load_image(image) if image else None, "answer": None}
    tokens = module.model.generate(module.make_collator()([sample]), max_new_tokens=max_new_tokens)
    return module.model.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


def ask_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mma ask", description=__doc__)
    parser.add_argument("question", help="the question (the whole prompt unless --choices is given)")
    parser.add_argument("--adapter", required=True, help="adapter folder written by mma export")
    parser.add_argument("--image", help="picture the question is about (optional)")
    parser.add_argument("--choices", nargs="+", help="answer options, for a multiple-choice prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer (default: %(default)s)")
    parser.add_argument("--ignore-fingerprint", action="store_true", help="load onto other backbones anyway")
    args = parser.parse_args(argv)
    image = Path(args.image) if args.image else None
    print(ask(Path(args.adapter), args.question, image, args.choices, args.max_new_tokens, args.ignore_fingerprint))
