"""The factual-recall scorer: exact match after folding case, accents and punctuation.

The facts themselves, their templates and their prompts are the corpus's (`titanmem.data.facts`).
"""

from __future__ import annotations

import unicodedata


def normalize(text: str) -> str:
    """Case, accents and punctuation folded away, whitespace collapsed: "São Tomé!" -> "sao tome"."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = []
    for char in decomposed:
        category = unicodedata.category(char)
        if category == "Mn":  # combining accents
            continue
        kept.append(" " if category[0] in "PSZC" else char)
    return " ".join("".join(kept).casefold().split())


def is_exact_match(completion: str, answer: str) -> bool:
    """The completion starts with the whole answer, followed by the end or a word break ("Gaborone." matches
    "Gaborone"; "Gaboronesque" and "18" for "1" do not)."""
    got, wanted = normalize(completion), normalize(answer)
    return bool(wanted) and (got == wanted or got.startswith(wanted + " "))
