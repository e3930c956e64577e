"""Continuous batching: requests join the running batch between decode steps and leave as soon as they end.

One thread owns a `Batch` over the engine's shared KV buffer (one slot per running job). Each turn it
admits waiting jobs into free slots (prompts that arrived together are prefilled together, one pass over
their slots), runs one decode step of the batch, and hands each job its new text through its `emit`
callback. The decode loop itself is loop.py's; this module keeps only queueing, admission and delivery.

Isolation: a job whose prefill, token choice or callback fails ends alone with an "error" event; a failed
decode step fails the jobs running in it, never the waiting ones. If the thread itself dies, `alive`
turns false, every job gets an event, and new submissions are refused.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gpt2_onnx.errors import Gpt2OnnxError, first_line

from .decoders import SharedBufferDecoder
from .engine import Engine
from .loop import Batch, Row
from .metrics import Metrics
from .sampling import TokenLogprob


class QueueFull(Gpt2OnnxError):
    pass


class Unavailable(Gpt2OnnxError):
    """The scheduler is shutting down or its thread has died: no new work is taken."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # rows decoded together (slots of the KV buffer)
    max_queue: int = 256  # rows waiting for a slot; more are refused (QueueFull), never buffered
    # the KV buffer (max_batch rows of the model's full context) on 2 MB pages, committed at start: attention
    # ~10 % faster, but all of it is held (decoders.zeroed). None: when the engine uses huge pages and the whole
    # buffer is affordable (hugepages.affordable: at most a quarter of memory; gpt2, 32 rows: 2.4 GB)
    kv_huge_pages: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise Gpt2OnnxError(f"max_batch ({self.max_batch}) and max_queue ({self.max_queue}) must be >= 1")


@dataclass(frozen=True)
class Event:
    index: int  # which choice of its HTTP request
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "stop", "length", "cancelled" or "error"
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One row of one request, and where its events go."""

    row: Row
    emit: Callable[[Event], None]  # called from the scheduler thread
    index: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    entries_sent: int = 0  # log-probability entries already handed out
    answered: bool = False  # its first token has been delivered
    # False: one event when the row ends (a whole answer needs no per-token wakeup of its listener, which on a
    # small machine takes CPU from the decode step); True: an event per token
    stream: bool = True

    def cancel(self) -> None:
        self.row.cancelled = True  # the scheduler drops the row at its next turn


class Scheduler:
    def __init__(self, engine: Engine, config: SchedulerConfig = SchedulerConfig()) -> None:
        decoder = engine.new_decoder()
        if not isinstance(decoder, SharedBufferDecoder):
            raise Gpt2OnnxError(f"{engine.model_dir} is a reference-graph export; continuous batching needs the "
                                "fast graph: re-export without --graph reference")
        self.engine, self.config = engine, config
        self._allocate(decoder)
        where = ("on the device" if engine.provider != "cpu" else
                 "on 2 MB pages" if decoder.on_huge_pages else "on 4 KB pages, committed as rows grow")
        self.kv_summary = f"KV buffer {decoder.buffer_bytes(config.max_batch, decoder.max_length) / 1e6:.0f} MB {where}"
        self.batch = Batch(decoder, on_token=self._deliver)
        self.waiting: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}  # id(row) -> job, for the rows in the batch
        self.wakeup = threading.Condition()
        self.stopping = False
        self.death: str | None = None  # why the thread died, if it did
        self.metrics = Metrics(gauges={"queue_depth": lambda: len(self.waiting), "running": lambda: len(self.jobs),
                                       "max_batch": lambda: config.max_batch, "alive": lambda: int(self.alive)})
        self.thread = threading.Thread(target=self._run, name="gpt2-onnx-scheduler", daemon=True)

    def _allocate(self, decoder: SharedBufferDecoder) -> None:
        """max_batch rows of the model's whole context; on 2 MB pages committed now, before any request."""
        decoder.allocate(self.config.max_batch, self.engine.manifest.n_positions, self.config.kv_huge_pages)
        if decoder.on_huge_pages:
            decoder.commit()

    @property
    def kv_huge_pages(self) -> bool:
        return self.batch.decoder.on_huge_pages

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.death is None and not self.stopping

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none."""
        with self.wakeup:
            if self.stopping or self.death:
                raise Unavailable(self.death or "the server is shutting down")
            if len(self.waiting) + len(jobs) > self.config.max_queue:
                raise QueueFull(f"the queue is full ({len(self.waiting)} of {self.config.max_queue} rows waiting)")
            self.waiting.extend(jobs)
            self.wakeup.notify()

    def stop(self) -> None:
        """Cancel what is running or waiting (each gets a "cancelled" event) and end the thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread.is_alive():
            self.thread.join()
        self._end_all("cancelled")

    # -- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:  # noqa: BLE001 - the thread must say why it died, then everyone is told
            self.death = f"the scheduler stopped: {type(exc).__name__}: {first_line(exc)}; restart the server"
            self.metrics.count("scheduler_deaths_total")
            self._end_all("error", self.death)

    def _turn(self) -> bool:
        with self.wakeup:
            while not (self.waiting or self.jobs or self.stopping):
                self.wakeup.wait()
            if self.stopping:
                return False
            free = self.config.max_batch - len(self.batch.rows)
            admitted = [self.waiting.popleft() for _ in range(min(len(self.waiting), free))]
        self._admit([job for job in admitted if not job.row.cancelled])
        self._drop_finished()
        if self.batch.rows:
            started = time.perf_counter()
            try:
                self.batch.step()
            except Exception as exc:  # noqa: BLE001 - the step failed for every running row, not for the server
                self._fail_running(exc)
            self.metrics.observe("decode_step_seconds", time.perf_counter() - started)
            self._drop_finished()
        return True

    def _admit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.jobs[id(job.row)] = job
            self.metrics.count("prompt_tokens_total", len(job.row.prompt))
        self.batch.admit([job.row for job in jobs])  # a prompt that fails ends alone, its event delivered
        for job in jobs:
            if job.row.done and job.row not in self.batch.rows:  # it never got a slot: nothing will drop it
                self.jobs.pop(id(job.row), None)

    def _deliver(self, row: Row) -> None:
        job = self.jobs[id(row)]
        if row.new_ids and not job.answered:
            job.answered = True
            self.metrics.observe("time_to_first_token_seconds", time.perf_counter() - job.submitted)
        self.metrics.count("generated_tokens_total", 1 if row.new_ids and row.finish_reason != "error" else 0)
        if row.finish_reason:
            self.metrics.observe("request_latency_seconds", time.perf_counter() - job.submitted)
            self.metrics.count("requests_finished_total", labels={"reason": row.finish_reason})
        elif not job.stream:
            return
        entries = row.entries[job.entries_sent:]
        job.entries_sent = len(row.entries)
        event = Event(job.index, row.unsent_text(), entries, row.finish_reason, row.error)
        try:
            job.emit(event)
        except Exception:  # noqa: BLE001 - nobody is listening any more: the row leaves the batch
            row.cancelled = True

    def _drop_finished(self) -> None:
        for row in self.batch.drop_finished():
            self.jobs.pop(id(row), None)

    def _fail_running(self, exc: Exception) -> None:
        message = f"the decode step failed: {type(exc).__name__}: {first_line(exc)}"
        for row in self.batch.rows:
            if not row.done:
                row.finish("error", message)
                self._deliver(row)
        self.metrics.count("failed_steps_total")
        self._allocate(self.batch.decoder)  # a clean buffer
        self.batch.rows.clear()
        self.jobs.clear()

    def _end_all(self, reason: str, error: str | None = None) -> None:
        with self.wakeup:
            jobs = [*self.jobs.values(), *self.waiting]
            self.jobs.clear()
            self.waiting.clear()
        for job in jobs:
            try:
                job.emit(Event(job.index, finish_reason=reason, error=error))
            except Exception:  # noqa: BLE001 - best effort: the listener may be gone
                pass
