"""The Engine: one object to load an export, one call to generate.

The loop (as gpt-fast's): prefill the prompts once, then one decode step per token from the KV cache.
`generate` and `stream` both consume `decode_steps`, so there is one loop.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError

from .config import GenerationConfig, GenerationResult, Timings
from .kv_cache import ConcatCacheDecoder, SharedBufferDecoder
from .sampling import choose_token
from .session import create_session, load_tokenizer, read_model_info

Prompt = str | Sequence[int]


class Engine:
    def __init__(self, model_dir: str | Path, provider: str = "cpu", threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise Gpt2OnnxError(f"model folder {self.model_dir} does not exist; "
                                f"create it with `gpt2-onnx export SOURCE {self.model_dir}`")
        self.info = read_model_info(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.provider = provider
        self.session = create_session(self.model_dir, provider, threads)

    # -- public API -------------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None,
                 **options) -> GenerationResult | list[GenerationResult]:
        """A prompt (text or token ids) -> one result; a list of prompts -> a list, decoded as one batch."""
        config = _config(config, options)
        single = _is_single(prompts)
        rows = [self.new_row(p, config) for p in ([prompts] if single else prompts)]
        started = time.perf_counter()
        for _ in self.decode_steps(rows):
            pass
        total_ms = (time.perf_counter() - started) * 1e3
        results = [row.result(self.tokenizer, total_ms) for row in rows]
        return results[0] if single else results

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **options) -> Iterator[str]:
        """Yield the continuation's text piece by piece, never splitting a character or a stop string."""
        row = self.new_row(prompt, _config(config, options))
        for _ in self.decode_steps([row]):
            if piece := row.unsent_text(self.tokenizer):
                yield piece

    def new_row(self, prompt: Prompt, config: GenerationConfig, seed_offset: int = 0) -> Row:
        """A prompt ready for the loop; rows of one seed sample alike unless given different offsets."""
        seed = None if config.seed is None else config.seed + seed_offset
        return Row(self.encode(prompt), config, self.info.eos_token_id, np.random.default_rng(seed))

    def encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise Gpt2OnnxError("the prompt is empty; give at least one token of text")
        if max(ids) >= self.info.vocab_size or min(ids) < 0:
            raise Gpt2OnnxError(f"token ids must be in [0, {self.info.vocab_size}); got {min(ids)}..{max(ids)}")
        return ids

    def new_decoder(self) -> ConcatCacheDecoder | SharedBufferDecoder:
        """A fresh KV cache over this engine's session (one per generation)."""
        kind = SharedBufferDecoder if self.info.graph == "fast" else ConcatCacheDecoder
        return kind(self.session, self.info, self.provider)

    # -- the loop ---------------------------------------------------------------------------------

    def decode_steps(self, rows: list[Row]) -> Iterator[int]:
        """Prefill, then decode until every row has finished; yields the step number after each token.
        A finished row leaves the batch, so later steps run only the rows still generating."""
        self._check_fits(rows)
        decoder = self.new_decoder()
        start = time.perf_counter()
        max_length = max(len(row.prompt) + row.config.max_new_tokens for row in rows)
        logits = decoder.prefill([row.prompt for row in rows], max_length)  # [B, V] at each prompt's last token
        for row in rows:
            row.prefill_ms = (time.perf_counter() - start) * 1e3
        active = list(rows)
        for step in itertools.count():
            for row, row_logits in zip(active, logits):
                row.append(row.choose(row_logits), self.tokenizer)
            yield step
            drop_finished(decoder, active)
            if not active:
                return
            start = time.perf_counter()
            logits = decoder.decode(np.array([row.last_token for row in active], np.int64))
            step_ms = (time.perf_counter() - start) * 1e3
            for row in active:
                row.decode_ms.append(step_ms)

    def _check_fits(self, rows: list[Row]) -> None:
        for row in rows:
            if len(row.prompt) + row.config.max_new_tokens > self.info.n_positions:
                raise Gpt2OnnxError(
                    f"prompt ({len(row.prompt)} tokens) + max_new_tokens ({row.config.max_new_tokens}) exceeds the "
                    f"model's context of {self.info.n_positions} tokens; shorten the prompt or lower max_new_tokens")


def drop_finished(decoder, active: list[Row]) -> None:
    """Finished rows leave the batch: each hole is filled by the last row, in the decoder as in `active`."""
    for i in reversed(range(len(active))):
        if active[i].finish_reason:
            decoder.remove(i)
            active[i] = active[-1]
            active.pop()


@dataclass
class Row:
    """One prompt's progress through the loop, with its own settings and random generator."""

    prompt: list[int]
    config: GenerationConfig
    eos_token_id: int
    rng: np.random.Generator
    new_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # text is cut here when a stop string matched
    sent: int = 0  # characters of text already handed out by `unsent_text`
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)

    @property
    def last_token(self) -> int:
        return self.new_ids[-1] if self.new_ids else self.prompt[-1]

    def choose(self, logits: np.ndarray) -> int:
        if len(self.new_ids) < self.config.min_new_tokens:
            logits = logits.copy()
            logits[self.eos_token_id] = -np.inf  # EOS is not allowed yet
        return choose_token(logits, self.config, self.rng, np.asarray(self.prompt + self.new_ids))

    def append(self, token: int, tokenizer) -> None:
        self.new_ids.append(token)
        if token == self.eos_token_id:
            self.finish_reason = "eos"
        elif self.config.stop and self._find_stop(tokenizer, self.config.stop):
            self.finish_reason = "stop"
        elif len(self.new_ids) >= self.config.max_new_tokens:
            self.finish_reason = "length"

    def _find_stop(self, tokenizer, stops: tuple[str, ...]) -> bool:
        text = tokenizer.decode(self.new_ids)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            self.stop_at = min(hits)
        return bool(hits)

    def text(self, tokenizer) -> str:
        ids = self.new_ids[:-1] if self.finish_reason == "eos" else self.new_ids
        text = tokenizer.decode(ids)
        return text[: self.stop_at] if self.stop_at is not None else text

    def unsent_text(self, tokenizer) -> str:
        """Text not handed out yet, holding back a broken character or the start of a stop string."""
        text = self.text(tokenizer)
        end = len(text) if self.finish_reason else _safe_end(text, self.config.stop)
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def result(self, tokenizer, total_ms: float) -> GenerationResult:
        per_token = float(np.mean(self.decode_ms)) if self.decode_ms else 0.0
        return GenerationResult(
            text=self.text(tokenizer),
            token_ids=list(self.new_ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt),
            timings=Timings(prefill_ms=self.prefill_ms, per_token_ms=per_token, total_ms=total_ms),
        )


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown: hold back a broken character and any start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k:end] == stop[:k]:
                end -= k
                break
    return end


def _is_single(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, Sequence) and len(prompts) == 0:
        raise Gpt2OnnxError("the prompt list is empty; pass a string, a list of token ids, or a list of either")
    return isinstance(prompts, (Sequence, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompts)


def _config(config: GenerationConfig | None, options: dict) -> GenerationConfig:
    if config is not None and options:
        from dataclasses import replace
        return replace(config, **options)
    return config or GenerationConfig(**options)
