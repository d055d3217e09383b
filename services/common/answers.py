"""Yes/no answer parsing shared by serving, pair construction and evaluation.

The rule is MMed-RAG's: take the text before the first ".", drop commas, split on spaces; any token
``No``, ``no`` or ``not`` makes the answer "no", otherwise it is "yes". The same rule labels the
ground truth ("Yes." / "No"), so a prediction and a label are always compared on equal terms.
"""

from typing import Literal

YesNo = Literal["yes", "no"]

_NEGATIVE_TOKENS = frozenset({"No", "no", "not"})


def parse_yes_no(text: str) -> YesNo:
    """Map free text to "yes" or "no" with the MMed-RAG rule (first sentence, negation tokens)."""
    first_sentence = text.split(".", 1)[0].replace(",", "")
    tokens = first_sentence.split(" ")
    return "no" if any(token.strip() in _NEGATIVE_TOKENS for token in tokens) else "yes"
