"""Continuous batching: requests join the running batch between decode steps and leave as soon as they end.

One thread owns the engine's shared KV buffer (one slot per running request). Each turn it prefills the
waiting requests into free slots (one row at a time: GroupQueryAttention refuses a batched prefill on a
non-empty past), runs one decode step over every running row, and hands each request its new text through
its `emit` callback. Finished and cancelled rows leave the buffer at once, so a slot is never idle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError

from .generate import Engine, Row, drop_finished
from .kv_cache import SharedBufferDecoder
from .metrics import Metrics
from .sampling import token_logprobs


class QueueFull(Gpt2OnnxError):
    pass


class ShuttingDown(Gpt2OnnxError):
    pass


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # rows decoded together (slots of the KV buffer)
    max_queue: int = 256  # requests waiting for a slot; more are refused (QueueFull), never buffered


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


@dataclass(frozen=True)
class Event:
    index: int  # which choice of its HTTP request
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "stop", "length", "cancelled" or "error"
    error: str | None = None


@dataclass
class Request:
    row: Row
    emit: Callable[[Event], None]  # called from the scheduler thread
    index: int = 0
    logprobs: int | None = None  # None: no log-probabilities; N: the chosen token's and the top N
    echo: bool = False  # also return the prompt (and its log-probabilities)
    generate: bool = True  # False: score the prompt only (OpenAI's max_tokens=0 with echo)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def finish_reason(self) -> str | None:
        return "cancelled" if self.cancelled else self.row.finish_reason


class Scheduler:
    def __init__(self, engine: Engine, config: SchedulerConfig = SchedulerConfig()) -> None:
        decoder = engine.new_decoder()
        if not isinstance(decoder, SharedBufferDecoder):
            raise Gpt2OnnxError(f"{engine.model_dir} is a reference-graph export; continuous batching needs the "
                                "fast graph: re-export without --graph reference")
        decoder.allocate(config.max_batch, engine.info.n_positions)
        self.engine, self.config, self.decoder = engine, config, decoder
        self.tokenizer = engine.tokenizer
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.wakeup = threading.Condition()
        self.stopping = False
        self.metrics = Metrics(gauges={"queue_depth": lambda: len(self.waiting), "running": lambda: len(self.active),
                                       "max_batch": lambda: config.max_batch})
        self.thread = threading.Thread(target=self._loop, name="gpt2-onnx-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.wakeup:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry later")
            self.waiting.append(request)
            self.wakeup.notify()

    def stop(self) -> None:
        """Cancel what is running or waiting (each gets a "cancelled" event) and end the thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread.is_alive():
            self.thread.join()
        for request in [*self.active, *self.waiting]:
            request.emit(Event(request.index, finish_reason="cancelled"))
        self.active.clear()
        self.waiting.clear()

    # -- the scheduler thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not (self.waiting or self.active or self.stopping):
                    self.wakeup.wait()
                if self.stopping:
                    return
                admitted = [self.waiting.popleft()
                            for _ in range(min(len(self.waiting), self.config.max_batch - len(self.active)))]
            try:
                for request in admitted:
                    if not request.cancelled:
                        self._admit(request)
                drop_finished(self.decoder, self.active)
                if self.active:
                    self._step()
                    drop_finished(self.decoder, self.active)
            except Exception as exc:  # a failed step fails its requests, not the server
                self._fail_all(exc)

    def _admit(self, request: Request) -> None:
        row = request.row
        start = time.perf_counter()
        scored = request.echo and request.logprobs is not None
        logits = self.decoder.add(row.prompt, all_logits=scored)
        self.active.append(request)
        row.prefill_ms = (time.perf_counter() - start) * 1e3
        self.metrics.count("prompt_tokens_total", len(row.prompt))
        if request.echo:
            entries = [TokenLogprob(row.prompt[0], None, [])]
            if scored:
                entries += [TokenLogprob(token, *token_logprobs(logits[t], token, request.logprobs))
                            for t, token in enumerate(row.prompt[1:])]
            request.emit(Event(request.index, self.tokenizer.decode(row.prompt), entries if scored else []))
        if not request.generate:
            row.finish_reason = "length"
            request.emit(Event(request.index, finish_reason="length"))
            self._finished(request)
            return
        self._advance(request, logits[-1])

    def _step(self) -> None:
        start = time.perf_counter()
        logits = self.decoder.decode(np.array([r.row.last_token for r in self.active], np.int64))
        self.metrics.observe("decode_step_seconds", time.perf_counter() - start)
        for request, row_logits in zip(self.active, logits):
            if not request.cancelled:
                self._advance(request, row_logits)

    def _advance(self, request: Request, logits: np.ndarray) -> None:
        row = request.row
        token = row.choose(logits)
        entries = [] if request.logprobs is None else [TokenLogprob(token, *token_logprobs(logits, token, request.logprobs))]
        row.append(token, self.tokenizer)
        if len(row.new_ids) == 1:
            self.metrics.observe("time_to_first_token_seconds", time.perf_counter() - request.submitted)
        self.metrics.count("generated_tokens_total")
        request.emit(Event(request.index, row.unsent_text(self.tokenizer), entries, row.finish_reason))
        if row.finish_reason:
            self._finished(request)

    def _finished(self, request: Request) -> None:
        self.metrics.observe("request_latency_seconds", time.perf_counter() - request.submitted)
        self.metrics.count(f'requests_finished_total{{reason="{request.row.finish_reason}"}}')

    def _fail_all(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        for request in self.active:
            request.emit(Event(request.index, finish_reason="error", error=message))
        self.metrics.count("failed_steps_total")
        self.decoder.allocate(self.config.max_batch, self.decoder.max_length)  # a clean buffer for what comes next
        self.active.clear()
