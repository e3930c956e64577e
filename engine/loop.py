"""The one decode loop: rows of a batch over one decoder, as gpt-fast's prefill / decode_one_token split.

    start(rows)      prefill a first set of rows together; each chooses its first token
    admit(rows)      prefill more rows into free slots while the others decode (fast graph)
    step()           one decode step: every live row chooses and appends its next token
    drop_finished()  rows that ended (EOS, stop string, length, error, cancelled) leave the decoder

`Engine.generate` / `stream` and the continuous-batching scheduler both drive a `Batch`; the choice of
a token, the stop rules, the timings and the per-row isolation of failures live here and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gpt2_onnx.errors import first_line

from .config import GenerationConfig, GenerationResult, Timings
from .decoders import prefill_groups
from .detokenize import IncrementalText, safe_end
from .sampling import TokenLogprob, choose_token, token_logprobs


@dataclass(eq=False)
class Row:
    """One prompt's progress: its settings, random generator, tokens, text and timings."""

    prompt: list[int]
    config: GenerationConfig
    eos_token_id: int
    rng: np.random.Generator
    text: IncrementalText
    logprobs: int | None = None  # record each new token's log-probability and its `logprobs` best rivals
    score_prompt: bool = False  # also record the log-probability of every prompt token (OpenAI echo)
    new_ids: list[int] = field(default_factory=list)
    entries: list[TokenLogprob] = field(default_factory=list)  # prompt entries (when scored), then new tokens
    finish_reason: str | None = None  # "eos", "stop", "length" or "error"
    error: str | None = None
    cancelled: bool = False  # set from another thread: the row leaves at the next drop
    stop_at: int | None = None  # text is cut here when a stop string matched
    sent: int = 0  # characters of text already handed out by `unsent_text`
    prefill_ms: float = 0.0
    decode_ms: float = 0.0  # summed over steps
    steps: int = 0
    seen: np.ndarray | None = field(default=None, repr=False)  # [V] bool, only with a repetition penalty
    counts: np.ndarray | None = field(default=None, repr=False)  # [V] new tokens, only with presence/frequency

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    @property
    def last_token(self) -> int:
        return self.new_ids[-1] if self.new_ids else self.prompt[-1]

    def choose(self, logits: np.ndarray) -> int:
        config = self.config
        if not self.new_ids:
            config.check_vocab(logits.shape[-1])
        held_back = None
        if len(self.new_ids) < config.min_new_tokens:
            held_back = [self.eos_token_id, *(config.stop_token_ids or ())]  # no end allowed yet
        if config.repetition_penalty != 1.0 and self.seen is None:
            self.seen = np.zeros(logits.shape[-1], bool)
            self.seen[self.prompt] = True
        if (config.presence_penalty or config.frequency_penalty) and self.counts is None:
            self.counts = np.zeros(logits.shape[-1], np.int64)
            np.add.at(self.counts, self.new_ids, 1)
        return choose_token(logits, config, self.rng, self.seen, self.counts, held_back)

    def append(self, token: int) -> None:
        self.new_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if token == self.eos_token_id:
            self.finish("eos")
            return
        if self.config.stop_token_ids and token in self.config.stop_token_ids:
            self.finish("stop")  # the token ends the text without being part of it, as EOS
            return
        before = len(self.text.text)
        if self.text.add(token) and self.config.stop and self._find_stop(before):
            self.finish("stop")
        elif len(self.new_ids) >= self.config.max_new_tokens:
            self.finish("length")

    def _find_stop(self, before: int) -> bool:
        """Look for stop strings only where the new text could complete one: O(new text), not O(text)."""
        text, longest = self.text.text, max(len(s) for s in self.config.stop)
        start = max(0, before - longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.config.stop) if i >= 0]
        if hits:
            self.stop_at = min(hits)
        return bool(hits)

    def finish(self, reason: str, error: str | None = None) -> None:
        if reason != "eos":
            self.text.flush()  # a character cut by the end shows as U+FFFD, as a whole decode would
        self.finish_reason, self.error = reason, error

    @property
    def final_text(self) -> str:
        text = self.text.text
        return text[: self.stop_at] if self.stop_at is not None else text

    def unsent_text(self) -> str:
        """Text not handed out yet, holding back a broken character or the start of a stop string."""
        text = self.final_text
        end = len(text) if self.finish_reason else safe_end(text, self.config.stop)
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def result(self, total_ms: float) -> GenerationResult:
        return GenerationResult(
            text=self.final_text, token_ids=list(self.new_ids), finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt),
            timings=Timings(prefill_ms=self.prefill_ms, per_token_ms=self.decode_ms / self.steps if self.steps else 0.0,
                            total_ms=total_ms),
            logprobs=list(self.entries) if self.logprobs is not None or self.score_prompt else None,
            error=self.error)


class Batch:
    """Rows decoding together over one decoder. `on_token(row)` runs after each row's every token
    (the scheduler hands out events there); a row whose token choice fails ends alone with "error"."""

    def __init__(self, decoder, on_token: Callable[[Row], None] | None = None) -> None:
        self.decoder = decoder
        self.rows: list[Row] = []  # live rows, in the decoder's slot order
        self.on_token = on_token or (lambda row: None)

    def start(self, rows: list[Row], max_length: int) -> None:
        """Prefill `rows` together (any graph) into a fresh cache of `max_length` tokens per row."""
        started = time.perf_counter()
        logits = self.decoder.prefill([row.prompt for row in rows], max_length)  # [B, V] at each last token
        elapsed = (time.perf_counter() - started) * 1e3
        self.rows = list(rows)
        for row, row_logits in zip(rows, logits):
            row.prefill_ms = elapsed
            self._first_token(row, row_logits)

    def admit(self, rows: list[Row]) -> None:
        """Prefill rows into free slots of a running batch (the fast graph's shared buffer): runs of prompts
        of similar length in one pass each (decoders.prefill_groups). A pass that fails is retried row by
        row, so that a prompt that cannot be prefilled ends alone, with "error"."""
        plain = [row for row in rows if not row.score_prompt]
        for group in prefill_groups([len(row.prompt) for row in plain]):
            together = [plain[i] for i in group]
            if len(together) > 1 and self._prefill_together(together):
                continue
            for row in together:
                self._admit_one(row)
        for row in rows:
            if row.score_prompt:
                self._admit_one(row)

    def _prefill_together(self, rows: list[Row]) -> bool:
        started = time.perf_counter()
        try:
            logits = self.decoder.add_many([row.prompt for row in rows])  # [k, V] at each last token
        except Exception:  # noqa: BLE001 - retried one by one by the caller, which names the row at fault
            return False
        elapsed = (time.perf_counter() - started) * 1e3
        self.rows += rows
        for row, row_logits in zip(rows, logits):
            row.prefill_ms = elapsed
            self._first_token(row, row_logits)
        return True

    def _admit_one(self, row: Row) -> None:
        started = time.perf_counter()
        try:
            logits = self.decoder.add(row.prompt, all_logits=row.score_prompt)  # [S or 1, V]
        except Exception as exc:  # noqa: BLE001 - this prompt failed; the batch goes on
            row.finish("error", f"prefill failed: {type(exc).__name__}: {first_line(exc)}")
            self.on_token(row)
            return
        row.prefill_ms = (time.perf_counter() - started) * 1e3
        self.rows.append(row)
        if row.score_prompt:
            top = row.logprobs or 0
            row.entries = [TokenLogprob(row.prompt[0], None, [])] + [
                token_logprobs(logits[t], token, top) for t, token in enumerate(row.prompt[1:])]
        self._first_token(row, logits[-1])

    def step(self) -> None:
        """One token for every live row, from one decode step over all of them."""
        started = time.perf_counter()
        logits = self.decoder.decode(np.array([row.last_token for row in self.rows], np.int64))
        elapsed = (time.perf_counter() - started) * 1e3
        for row, row_logits in zip(self.rows, logits):
            row.decode_ms += elapsed
            row.steps += 1
            if not row.done:
                self._advance(row, row_logits)

    def drop_finished(self) -> list[Row]:
        """Finished rows leave: each hole is filled by the last row, in the decoder as in `rows`."""
        dropped = []
        for i in reversed(range(len(self.rows))):
            if self.rows[i].done:
                self.decoder.remove(i)
                dropped.append(self.rows[i])
                self.rows[i] = self.rows[-1]
                self.rows.pop()
        return dropped

    def _first_token(self, row: Row, logits: np.ndarray) -> None:
        if row.config.max_new_tokens == 0:  # the prompt is only scored
            row.finish("length")
            self.on_token(row)
        else:
            self._advance(row, logits)

    def _advance(self, row: Row, logits: np.ndarray) -> None:
        try:
            token = row.choose(logits)
            if row.logprobs is not None:
                row.entries.append(token_logprobs(logits, token, row.logprobs))
            row.append(token)
        except Exception as exc:  # noqa: BLE001 - one row's failure must not end the others
            row.finish("error", f"{type(exc).__name__}: {first_line(exc)}")
        self.on_token(row)
