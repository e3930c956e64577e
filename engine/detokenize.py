"""Incremental detokenization: a row's text grows by decoding only its newest tokens.

GPT-2's byte-level BPE maps each token to bytes; a character can span several tokens. Tokens wait in
`pending` until they decode to whole characters (no trailing U+FFFD), then their text is appended, so
the cost per token is constant however long the generation (decoding the whole text each step is
O(n) per token, O(n^2) per generation).
"""

from __future__ import annotations

from tokenizers import Tokenizer

MAX_PENDING = 8  # a UTF-8 character is at most 4 bytes; past this the bytes are invalid, not incomplete
REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.pending: list[int] = []  # tokens whose bytes do not yet end on a character boundary

    def add(self, token: int) -> str:
        """Add one token; returns the text it completed ("" while a character is still open)."""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith(REPLACEMENT) and len(self.pending) < MAX_PENDING:
            return ""
        self.pending.clear()
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end: pending bytes decode as they are (a cut character shows as U+FFFD)."""
        piece = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending.clear()
        self.text += piece
        return piece


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown: hold back a broken character and any start of a stop string."""
    end = len(text.rstrip(REPLACEMENT))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k:end] == stop[:k]:
                end -= k
                break
    return end
