"""Prompt and answer text for multiple-choice questions, in the field's QCM layout."""

import re
from typing import Literal

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

AnswerStyle = Literal["letter", "text"]


def format_options(choices: list[str]) -> str:
    """``(A) red (B) green (C) blue``."""
    return " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def question_prompt(question: str, choices: list[str], context: str | None = None) -> str:
    """``Question: ...\\n[Context: ...\\n]Options: (A) ...\\nResponse:``; context is left out when None."""
    lines = [f"Question: {question}"]
    if context is not None:
        lines.append(f"Context: {context or 'N/A'}")
    lines += [f"Options: {format_options(choices)}", "Response:"]
    return "\n".join(lines)


def answer_text(choices: list[str], answer: int, style: AnswerStyle = "letter") -> str:
    """``The answer is B.`` (letters, as 7B recipes use) or ``The answer is pear.`` (option text).

    Small LMs cannot bind option letters within a short adapter run (measured on SmolLM2-135M), so the demo
    answers with the option's text.
    """
    return f"The answer is {LETTERS[answer] if style == 'letter' else choices[answer]}."


# ScienceQA prompt formats ("QCM-ALE" etc.) as the field names them. Input letters: Q(uestion), C(ontext),
# M (options), L(ecture), E (solution, the "explanation"); output letters A(nswer), L, E. We follow the ScienceQA
# and LaVIN code, except that L and E mean lecture and solution in every output format (that code swaps them in
# AL / AE).
INPUT_FORMATS = ("CQM", "QCM", "QCML", "QCME", "QCMLE", "QCLM", "QCEM", "QCLEM")
OUTPUT_FORMATS = ("A", "AL", "AE", "ALE", "AEL", "LA", "EA", "LEA", "ELA")
_FIELD_NAMES = {"Q": "Question", "C": "Context", "M": "Options"}
# The cloze format lists no options: each option's text is scored as the continuation of ``Answer:``, as
# evaluation harnesses do (lm-evaluation-harness, for ARC and SciQ).
CLOZE = "cloze"


def check_format(fmt: str) -> None:
    if fmt == CLOZE:
        return
    inputs, _, outputs = fmt.partition("-")
    if inputs not in INPUT_FORMATS or outputs not in OUTPUT_FORMATS:
        raise ValueError(
            f"unknown prompt format {fmt!r}: {CLOZE}, or inputs {INPUT_FORMATS} - outputs {OUTPUT_FORMATS}"
        )


def _explanation(letters: str, lecture: str, solution: str) -> str:
    return " ".join(lecture if letter == "L" else solution for letter in letters)


def scienceqa_input(fmt: str, question: str, context: str, options: str, lecture: str, solution: str) -> str:
    """The prompt, ending in ``Response:``; a run of L/E letters becomes one ``BECAUSE:`` line."""
    values = {"Q": question, "C": context, "M": options}
    lines = [
        f"{_FIELD_NAMES[part]}: {values[part]}"
        if part in values
        else f"BECAUSE: {_explanation(part, lecture, solution)}"
        for part in re.findall(r"[QCM]|[LE]+", fmt.split("-")[0])
    ]
    return "\n".join([*lines, "Response:"]).replace("  ", " ").strip()


def scienceqa_output(fmt: str, answer: str, lecture: str, solution: str) -> str:
    """``The answer is A. BECAUSE: ...`` when A comes first, ``... The answer is A.`` when it comes last."""
    letters = fmt.split("-")[1]
    explanation = _explanation(letters.replace("A", ""), lecture, solution).strip()
    if letters.startswith("A"):
        text = f"The answer is {answer}." + (f" BECAUSE: {explanation}" if explanation else "")
    else:
        text = f"{explanation} The answer is {answer}."
    return text.replace("  ", " ").strip()


def cloze_prompt(question: str, context: str) -> str:
    """``Question: [context\\n]question\\nAnswer:``; the options are not shown, their texts are scored."""
    return "Question: " + "\n".join(part for part in (context, question) if part) + "\nAnswer:"
