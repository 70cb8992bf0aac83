"""The demo's prompt: an excerpt of the GPL-3 text shipped in tqstore/data and a question about
it, sized to a token count. `tqstore demo` (tqstore/cli/demo.py) runs it through the daemon;
`tqstore bench hit` and the hit-path tests reuse the document."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
QUESTION = "\n\nWhat is this document, and who may copy it? Answer in two sentences."


def demo_document() -> str:
    """The long document of the demo: the GPL-3 text shipped in tqstore/data."""
    for candidate in sorted(DATA.glob("*")):
        if "gpl" in candidate.name.lower():
            return candidate.read_text()
    raise FileNotFoundError(f"no GPL text in {DATA}")


def build_prompt(loaded, target_tokens: int) -> list[int]:
    """The chat prompt (template, excerpt and question) with the most whole words of the
    document that keep it at or under ``target_tokens``; the whole document if that is shorter.

    Sized by tokenizing, not by a tokens-per-word estimate: an estimate from the opening words
    overshot 2,048 by 17% (the license's later sections tokenize denser)."""
    from tqstore.models.loader import chat_prompt_ids

    words = demo_document().split(" ")

    def prompt(n: int) -> list[int]:
        return chat_prompt_ids(loaded.tokenizer, " ".join(words[:n]) + QUESTION)

    lo, hi = 1, len(words)  # invariant: prompt(lo) fits (or lo == 1), prompt(hi + 1) does not
    if len(prompt(hi)) <= target_tokens:
        return prompt(hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(prompt(mid)) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return prompt(lo)
