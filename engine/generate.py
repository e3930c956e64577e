"""The Engine: one object to load an export, one call to generate.

The loop (as gpt-fast's): prefill the prompts once, then one decode step per token from the KV cache.
`generate` and `stream` both consume `decode_steps`, so there is one loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError

from .config import GenerationConfig, GenerationResult, Timings
from .kv_cache import ConcatCacheDecoder, SharedBufferDecoder
from .sampling import choose_token, row_generators
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
        batch = [self.encode(p) for p in ([prompts] if single else prompts)]
        rows = [Row(ids, self.info.eos_token_id) for ids in batch]
        started = time.perf_counter()
        for _ in self.decode_steps(rows, config):
            pass
        total_ms = (time.perf_counter() - started) * 1e3
        results = [row.result(self.tokenizer, total_ms) for row in rows]
        return results[0] if single else results

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **options) -> Iterator[str]:
        """Yield the continuation's text piece by piece, never splitting a character or a stop string."""
        config = _config(config, options)
        row = Row(self.encode(prompt), self.info.eos_token_id)
        sent = 0
        for _ in self.decode_steps([row], config):
            text = row.text(self.tokenizer)
            end = len(text) if row.finish_reason else _safe_end(text, config.stop)
            if end > sent:
                yield text[sent:end]
                sent = end

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

    def decode_steps(self, rows: list[Row], config: GenerationConfig) -> Iterator[int]:
        """Prefill, then decode until every row has finished; yields the step number after each token."""
        self._check_fits(rows, config)
        decoder = self.new_decoder()
        rngs = row_generators(config.seed, len(rows))
        input_ids, attention_mask = left_pad([row.prompt for row in rows], pad_id=self.info.eos_token_id)

        start = time.perf_counter()
        max_length = max(len(row.prompt) for row in rows) + config.max_new_tokens
        logits = decoder.prefill(input_ids, attention_mask, max_length)  # [B, V] at each prompt's last token
        prefill_ms = (time.perf_counter() - start) * 1e3
        for row in rows:
            row.prefill_ms = prefill_ms

        for step in range(config.max_new_tokens):
            for row, rng, row_logits in zip(rows, rngs, logits):
                if not row.finish_reason:
                    row.append(self._choose(row, row_logits, config, rng), config, self.tokenizer)
            yield step
            if all(row.finish_reason for row in rows):
                return
            # finished rows keep feeding their last token; their logits are ignored
            start = time.perf_counter()
            logits = decoder.decode(np.array([row.last_token for row in rows], np.int64))
            step_ms = (time.perf_counter() - start) * 1e3
            for row in rows:
                if not row.finish_reason:
                    row.decode_ms.append(step_ms)

    def _choose(self, row: Row, logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
        if len(row.new_ids) < config.min_new_tokens:
            logits = logits.copy()
            logits[self.info.eos_token_id] = -np.inf  # EOS is not allowed yet
        return choose_token(logits, config, rng, np.asarray(row.prompt + row.new_ids))

    def _check_fits(self, rows: list[Row], config: GenerationConfig) -> None:
        longest = max(len(row.prompt) for row in rows)
        if longest + config.max_new_tokens > self.info.n_positions:
            raise Gpt2OnnxError(
                f"prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the model's "
                f"context of {self.info.n_positions} tokens; shorten the prompt or lower max_new_tokens")


@dataclass
class Row:
    """One prompt's progress through the loop."""

    prompt: list[int]
    eos_token_id: int
    new_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # text is cut here when a stop string matched
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)

    @property
    def last_token(self) -> int:
        return self.new_ids[-1] if self.new_ids else self.prompt[-1]

    def append(self, token: int, config: GenerationConfig, tokenizer) -> None:
        self.new_ids.append(token)
        if token == self.eos_token_id:
            self.finish_reason = "eos"
        elif config.stop and self._find_stop(tokenizer, config.stop):
            self.finish_reason = "stop"
        elif len(self.new_ids) >= config.max_new_tokens:
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

    def result(self, tokenizer, total_ms: float) -> GenerationResult:
        per_token = float(np.mean(self.decode_ms)) if self.decode_ms else 0.0
        return GenerationResult(
            text=self.text(tokenizer),
            token_ids=list(self.new_ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt),
            timings=Timings(prefill_ms=self.prefill_ms, per_token_ms=per_token, total_ms=total_ms),
        )


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> input_ids [B, S] and attention_mask [B, S], padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), pad_id, np.int64)
    attention_mask = np.zeros((len(prompts), width), np.int64)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt):] = prompt
        attention_mask[b, width - len(prompt):] = 1
    return input_ids, attention_mask


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
