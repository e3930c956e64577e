"""One completions request: checked and bounded before any work, its rows built off the event loop,
queued all or none, then answered whole or as server-sent events from the scheduler's events."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gpt2_onnx.engine import Engine
from gpt2_onnx.engine.engine import ContextTooLong
from gpt2_onnx.engine.scheduler import Event, Job, QueueFull, Scheduler, Unavailable
from gpt2_onnx.errors import Gpt2OnnxError

from .openai_api import (FINISH_REASONS, ApiError, CompletionRequest, chunk_body, completion_body, logprobs_body,
                         new_id, usage)

MAX_CHARS_PER_TOKEN = 128  # no GPT-2 token is longer: a text prompt past context x this cannot fit
INLINE_TOKENIZE_CHARS = 512  # prompts up to this many characters are tokenized on the event loop (~0.15 ms)
POLL_S = 0.05  # how often a stream checks that its client is still there
GONE = object()  # put in a whole answer's event queue when its client hangs up


class ClientGone(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    max_rows: int  # prompts x n in one request
    request_timeout_s: float
    retry_after_s: int = 1


async def submit(engine: Engine, scheduler: Scheduler, body: CompletionRequest, limits: Limits,
                 model: str) -> Completion:
    if error := body.unsupported():
        raise error
    config = body.generation_config(engine.manifest.vocab_size)
    prompts, per_prompt = body.prompts(), body.rows_per_prompt  # n, or best_of
    if len(prompts) * per_prompt > limits.max_rows:
        raise ApiError(400, f"{len(prompts)} prompt(s) x {per_prompt} choices is {len(prompts) * per_prompt} rows; "
                            f"this server takes at most {limits.max_rows} per request",
                       "n" if per_prompt > 1 else "prompt")
    for prompt in prompts:
        _check_text(prompt, engine.manifest.n_positions)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731 (from the scheduler thread)
    if sum(len(p) for p in prompts if isinstance(p, str)) <= INLINE_TOKENIZE_CHARS:
        jobs = _jobs(engine, body, prompts, config, emit)  # cheaper than the hand-off to a thread
    else:
        jobs = await asyncio.to_thread(_jobs, engine, body, prompts, config, emit)  # keep the event loop free
    try:
        scheduler.submit(jobs)
    except QueueFull as exc:
        raise ApiError(429, f"{exc}; retry later", kind="server_overloaded", code="queue_full",
                       headers={"Retry-After": str(limits.retry_after_s)}) from None
    except Unavailable as exc:
        raise ApiError(503, str(exc), kind="server_error", code="unavailable") from None
    scheduler.metrics.count("completion_requests_total")
    prompt_texts = None
    if body.echo:  # each prompt decoded once, repeated for its n choices
        per_prompt = [engine.tokenizer.decode(job.row.prompt) for job in jobs[:: body.rows_per_prompt]]
        prompt_texts = [text for text in per_prompt for _ in range(body.rows_per_prompt)]
    return Completion(new_id(), model, body, jobs, events, engine.tokenizer.decode, scheduler, limits, prompt_texts)


def _check_text(prompt, n_positions: int) -> None:
    if not isinstance(prompt, str):
        return
    if len(prompt) > n_positions * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"the prompt has {len(prompt)} characters: it cannot fit the model's context of "
                            f"{n_positions} tokens", "prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the prompt is not valid Unicode (a lone surrogate such as \\ud800)", "prompt") from None


def _jobs(engine: Engine, body: CompletionRequest, prompts: list, config, emit) -> list[Job]:
    jobs = []
    for i, prompt in enumerate(prompts):
        try:
            ids = engine.encode(prompt)  # once per prompt, whatever its n
            rows = [engine.new_row(ids, config, seed_offset=j, logprobs=body.row_logprobs,
                                   score_prompt=body.echo and body.logprobs is not None)
                    for j in range(body.rows_per_prompt)]
        except ContextTooLong as exc:
            raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens"), "max_tokens") from None
        except Gpt2OnnxError as exc:
            raise ApiError(400, str(exc), "prompt") from None
        jobs += [Job(row, emit, index=i * body.rows_per_prompt + j, stream=bool(body.stream))
                 for j, row in enumerate(rows)]
    return jobs


class Completion:
    """The events of one HTTP request's jobs, answered whole or as server-sent events."""

    def __init__(self, completion_id: str, model: str, body: CompletionRequest, jobs: list[Job],
                 events: asyncio.Queue, decode, scheduler: Scheduler, limits: Limits,
                 prompt_texts: list[str] | None) -> None:
        self.id, self.model, self.body, self.jobs, self.events = completion_id, model, body, jobs, events
        self.decode = decode
        self.metrics, self.limits = scheduler.metrics, limits
        self.echo = list(prompt_texts) if prompt_texts else None  # sent before each choice's first text
        self.offsets = [0] * len(jobs)  # characters already sent per choice, for logprobs' text_offset
        self.deadline = time.monotonic() + limits.request_timeout_s

    async def events_until_done(self, request: Request):
        """Each event until every choice has finished; ends early (ClientGone) when the client hangs up,
        or with a 504 at the request's time limit."""
        pending = {job.index for job in self.jobs}
        # A whole answer's one event comes at the end: a watcher tells when its client hangs up, so the
        # event loop is not woken to poll (CPU a small machine's decode step shares). A stream polls.
        watcher = None if self.body.stream else asyncio.create_task(self._watch_disconnect(request))
        poll_s = POLL_S if self.body.stream else float("inf")
        checked = time.monotonic()
        try:
            while pending:
                try:  # wake for the next event, the next client check, or the time limit, whichever is first
                    wait = min(poll_s, max(0.0, self.deadline - time.monotonic()))
                    event: Event | None = await asyncio.wait_for(self.events.get(), wait)
                except asyncio.TimeoutError:
                    event = None
                now = time.monotonic()
                if event is GONE:
                    raise ClientGone
                if now >= self.deadline:
                    self.metrics.count("requests_timed_out_total")
                    raise ApiError(504, f"the request took longer than the server's limit of "
                                        f"{self.limits.request_timeout_s:g} s (--request-timeout)",
                                   kind="server_error", code="timeout")
                if now - checked >= poll_s:  # events may never pause: check on a clock, not on silence
                    checked = now
                    if await request.is_disconnected():
                        raise ClientGone
                if event is not None:
                    yield self._with_echo(event, pending)
        finally:
            if watcher:
                watcher.cancel()

    async def _watch_disconnect(self, request: Request) -> None:
        """The request's body is read: its next ASGI message is the client's disconnect, whenever it comes."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.events.put_nowait(GONE)

    def _with_echo(self, event: Event, pending: set[int]) -> Event:
        if self.echo is not None and self.echo[event.index] is not None:
            event = Event(event.index, self.echo[event.index] + event.text, event.logprobs, event.finish_reason,
                          event.error)
            self.echo[event.index] = None
        if event.finish_reason:
            pending.discard(event.index)
        return event

    def _logprobs(self, event: Event) -> dict | None:
        if self.body.logprobs is None:
            return None
        body = logprobs_body(event.logprobs, self.decode, self.offsets[event.index])
        self.offsets[event.index] += len(event.text)
        return body

    async def stream(self, request: Request):
        try:
            async for event in self.events_until_done(request):
                if event.finish_reason in ("cancelled", "error"):
                    yield f"data: {json.dumps(_failure(event).body())}\n\n"
                    break
                if event.text or event.finish_reason or event.logprobs:
                    yield f"data: {json.dumps(chunk_body(self.id, self.model, event, self._logprobs(event)))}\n\n"
            if self.body.stream_options and self.body.stream_options.include_usage:
                final = {"id": self.id, "object": "text_completion", "model": self.model, "choices": [],
                         "usage": usage(self._prompt_tokens(), self._completion_tokens())}
                yield f"data: {json.dumps(final)}\n\n"
        except ClientGone:
            return
        except ApiError as exc:  # the time limit, mid-stream: say so in the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:  # whatever ended the stream, its rows leave the batch
            self.cancel()
        yield "data: [DONE]\n\n"

    async def whole(self, request: Request) -> Response:
        texts = [""] * len(self.jobs)
        entries: list[list] = [[] for _ in self.jobs]
        failures: list[Event] = []
        try:
            async for event in self.events_until_done(request):
                texts[event.index] += event.text
                entries[event.index] += event.logprobs
                if event.finish_reason in ("cancelled", "error"):
                    failures.append(event)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            self.cancel()
        if failures:
            raise _failure(failures[0])
        choices = [{"index": i, "text": texts[i], "finish_reason": FINISH_REASONS.get(job.row.finish_reason),
                    "logprobs": None if self.body.logprobs is None else logprobs_body(entries[i], self.decode)}
                   for i, job in enumerate(self.jobs)]
        choices = self.body.best(choices, [[e.logprob for e in entries[i][len(entries[i]) - len(job.row.new_ids):]]
                                           for i, job in enumerate(self.jobs)])
        return JSONResponse(completion_body(self.id, self.model, choices, self._prompt_tokens(),
                                            self._completion_tokens()))

    def cancel(self) -> None:
        """Rows still generating leave the batch at the scheduler's next turn."""
        for job in self.jobs:
            if not job.row.done:
                job.cancel()
                self.metrics.count("requests_cancelled_total")

    def _prompt_tokens(self) -> int:
        return sum(len(job.row.prompt) for job in self.jobs[:: self.body.rows_per_prompt])

    def _completion_tokens(self) -> int:
        return sum(len(job.row.new_ids) for job in self.jobs)


def _failure(event: Event) -> ApiError:
    if event.finish_reason == "cancelled":
        return ApiError(503, "the server is shutting down; retry on another replica or later", kind="server_error",
                        code="shutting_down")
    return ApiError(500, f"generation failed: {event.error}", kind="server_error", code="generation_failed")
