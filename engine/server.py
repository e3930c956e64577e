"""`gpt2-onnx serve MODEL_DIR`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

    POST /v1/completions   OpenAI completions (stream, logprobs, echo, stop, seed, n)
    GET  /v1/models        the one model served
    GET  /health           liveness (never needs the API key)
    GET  /metrics          Prometheus text: requests, tokens, queue depth, latency histograms

FastAPI on uvicorn. Each HTTP request becomes one scheduler request per choice; the scheduler thread
pushes events into the request's asyncio queue. A client that goes away cancels its rows, which leave
the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gpt2_onnx.errors import Gpt2OnnxError

from .generate import Engine
from .openai_api import (FINISH_REASONS, ApiError, CompletionRequest, chunk_body, completion_body, logprobs_body,
                         new_id, usage)
from .scheduler import Event, QueueFull, Request as Job, Scheduler, SchedulerConfig, ShuttingDown


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the server has no TLS
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 256
    api_key: str | None = None
    model_name: str | None = None  # default: the model folder's name
    graceful_shutdown_s: float = 10.0  # in-flight requests get this long to finish, then are cancelled


def create_app(engine: Engine, config: ServerConfig = ServerConfig()) -> FastAPI:
    scheduler = Scheduler(engine, SchedulerConfig(config.max_batch, config.max_queue))
    model_name = config.model_name or engine.model_dir.name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()  # anything still running gets a "cancelled" event

    app = FastAPI(title="gpt2-onnx", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return JSONResponse(ApiError(400, f"{field}: {first['msg']}", field).body(), status_code=400)

    app.add_middleware(CountResponses, metrics=scheduler.metrics)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", kind="authentication_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 503 if scheduler.stopping else 200
        return JSONResponse({"status": "ok" if status == 200 else "shutting down", "model": model_name,
                             "running": len(scheduler.active), "waiting": len(scheduler.waiting)}, status_code=status)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gpt2-onnx",
                                            "max_model_len": engine.info.n_positions}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        jobs, events = _submit(engine, scheduler, body)
        completion = Completion(new_id(), model_name, body, jobs, events, engine.tokenizer.decode, scheduler.metrics)
        if body.stream:
            return StreamingResponse(completion.stream(), media_type="text/event-stream")
        return await completion.whole(request)

    return app


class CountResponses:
    """Counts responses by path and status. Plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's
    disconnect from the endpoint, which needs it to cancel the client's rows."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count(f'http_responses_total{{path="{scope["path"]}",status="{message["status"]}"}}')
            await send(message)
        await self.app(scope, receive, counting_send)


def _submit(engine: Engine, scheduler: Scheduler, body: CompletionRequest) -> tuple[list[Job], asyncio.Queue]:
    if error := body.unsupported():
        raise error
    config = body.generation_config()
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731 (called from the thread)
    jobs = []
    for i, prompt in enumerate(body.prompts()):
        for j in range(body.n):
            try:
                row = engine.new_row(prompt, config, seed_offset=j)
            except Gpt2OnnxError as exc:
                raise ApiError(400, str(exc), "prompt") from None
            new_tokens = config.max_new_tokens if body.max_tokens != 0 else 0  # None means OpenAI's default, 16
            if len(row.prompt) + new_tokens > engine.info.n_positions:
                raise ApiError(400, f"prompt ({len(row.prompt)} tokens) + max_tokens ({new_tokens}) exceeds the "
                                    f"model's context of {engine.info.n_positions} tokens", "max_tokens")
            jobs.append(Job(row, emit, index=i * body.n + j, logprobs=body.logprobs, echo=body.echo,
                            generate=body.max_tokens != 0))
    for submitted, job in enumerate(jobs):
        try:
            scheduler.submit(job)
        except (QueueFull, ShuttingDown) as exc:
            for earlier in jobs[:submitted]:
                earlier.cancelled = True
            status = 429 if isinstance(exc, QueueFull) else 503
            raise ApiError(status, str(exc), kind="server_overloaded" if status == 429 else "unavailable") from None
    scheduler.metrics.count("completion_requests_total")
    return jobs, events


class Completion:
    """The events of one HTTP request's jobs, answered whole or as server-sent events."""

    def __init__(self, completion_id: str, model: str, body: CompletionRequest, jobs: list[Job],
                 events: asyncio.Queue, decode, metrics) -> None:
        self.id, self.model, self.body, self.jobs, self.events = completion_id, model, body, jobs, events
        self.decode, self.metrics = decode, metrics
        self.offsets = [0] * len(jobs)  # characters already sent per choice, for logprobs' text_offset

    async def events_until_done(self):
        pending = {job.index for job in self.jobs}
        while pending:
            event: Event = await self.events.get()
            if event.finish_reason:
                pending.discard(event.index)
            yield event

    def _logprobs(self, event: Event) -> dict | None:
        if self.body.logprobs is None:
            return None
        body = logprobs_body(event.logprobs, self.decode, self.offsets[event.index])
        self.offsets[event.index] += len(event.text)
        return body

    async def stream(self):
        try:
            async for event in self.events_until_done():
                if event.finish_reason in ("cancelled", "error"):
                    error = ApiError(503 if event.finish_reason == "cancelled" else 500,
                                     event.error or "the server is shutting down", kind="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                if event.text or event.finish_reason or event.logprobs:
                    yield f"data: {json.dumps(chunk_body(self.id, self.model, event, self._logprobs(event)))}\n\n"
            if self.body.stream_options and self.body.stream_options.include_usage:
                final = {"id": self.id, "object": "text_completion", "model": self.model, "choices": [],
                         "usage": usage(self._prompt_tokens(), self._completion_tokens())}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: its rows leave the batch
            self.cancel()

    async def whole(self, request: Request) -> Response:
        texts = [""] * len(self.jobs)
        entries: list[list] = [[] for _ in self.jobs]
        finish: list[str | None] = [None] * len(self.jobs)

        async def collect() -> None:
            async for event in self.events_until_done():
                texts[event.index] += event.text
                entries[event.index] += event.logprobs
                finish[event.index] = event.finish_reason
        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            self.cancel()
        if "error" in finish or "cancelled" in finish:
            status = 500 if "error" in finish else 503
            raise ApiError(status, "generation failed" if status == 500 else "the server is shutting down",
                           kind="server_error")
        choices = [{"index": i, "text": texts[i], "finish_reason": FINISH_REASONS.get(finish[i]),
                    "logprobs": None if self.body.logprobs is None else logprobs_body(entries[i], self.decode)}
                   for i in range(len(self.jobs))]
        return JSONResponse(completion_body(self.id, self.model, choices, self._prompt_tokens(),
                                            self._completion_tokens()))

    def cancel(self) -> None:
        """Rows still generating leave the batch at the scheduler's next step."""
        for job in self.jobs:
            if job.row.finish_reason is None and not job.cancelled:
                job.cancelled = True
                self.metrics.count("requests_cancelled_total")

    def _prompt_tokens(self) -> int:
        return sum(len(job.row.prompt) for job in self.jobs[:: self.body.n])

    def _completion_tokens(self) -> int:
        return sum(len(job.row.new_ids) if job.generate else 0 for job in self.jobs)


def serve(model_dir: str | Path, config: ServerConfig = ServerConfig(), provider: str = "cpu",
          threads: int | None = None) -> None:
    import uvicorn

    engine = Engine(model_dir, provider=provider, threads=threads)
    app = create_app(engine, config)
    print(f"gpt2-onnx: serving {engine.model_dir} as {config.model_name or engine.model_dir.name!r} on "
          f"http://{config.host}:{config.port}/v1 (max batch {config.max_batch})", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=config.graceful_shutdown_s)
