"""Prompt and answer text for multiple-choice questions, in the field's QCM layout."""

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
