"""`gpt2-onnx serve MODEL_DIR`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

    POST /v1/completions   OpenAI completions (stream, logprobs, echo, stop, seed, n)
    GET  /v1/models        the one model served
    GET  /health           200 while the scheduler runs, 503 when it is shutting down or has died
    GET  /metrics          Prometheus text: requests, tokens, queue depth, latency histograms

FastAPI on uvicorn. Each HTTP request becomes one scheduler job per choice; the scheduler thread pushes
events into the request's asyncio queue. Every error is answered in OpenAI's shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gpt2_onnx.engine import Engine
from gpt2_onnx.engine.scheduler import Scheduler, SchedulerConfig

from .completion import Limits, submit
from .config import ServerConfig
from .guard import Guard, GuardConfig
from .openai_api import ApiError, CompletionRequest, check_model
from .routes_extra import add_extra_routes

def create_app(engine: Engine, config: ServerConfig = ServerConfig(),
               metrics_text: Callable[[], Awaitable[str]] | None = None) -> FastAPI:
    """`metrics_text`, when given, answers GET /metrics instead of this scheduler's own counters (Ray Serve
    replicas answer with the whole deployment's, serve/ray_metrics.py)."""
    scheduler = Scheduler(engine, SchedulerConfig(config.max_batch, config.max_queue, config.kv_huge_pages))
    model_name = config.model_name or engine.model_dir.name
    limits = Limits(min(config.max_rows_per_request, config.max_queue), config.request_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()  # anything still running gets a "cancelled" event

    app = FastAPI(title="gpt2-onnx", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else first["msg"]
        return JSONResponse(ApiError(400, f"{field}: {message}", field).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kinds = {404: ("not_found", f"no route {request.method} {request.url.path}; this server offers "
                                    "/v1/completions, /v1/models, /health and /metrics (no chat completions)")}
        code, message = kinds.get(exc.status_code, (None, str(exc.detail)))
        return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: still OpenAI's shape
        scheduler.metrics.count("unexpected_errors_total")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if scheduler.alive else 503
        state = "ok" if status == 200 else (scheduler.death or "shutting down")
        return JSONResponse({"status": state, "model": model_name, "running": len(scheduler.jobs),
                             "waiting": len(scheduler.waiting)}, status_code=status)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = await metrics_text() if metrics_text else scheduler.metrics.render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gpt2-onnx",
                                            "max_model_len": engine.manifest.n_positions}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model, model_name)
        if not scheduler.alive:
            raise ApiError(503, scheduler.death or "the server is shutting down", kind="server_error",
                           code="unavailable")
        completion = await submit(engine, scheduler, body, limits, model_name)
        if body.stream:
            return StreamingResponse(completion.stream(request), media_type="text/event-stream")
        return await completion.whole(request)

    add_extra_routes(app, engine, model_name)  # tokenizer endpoints, manifest, attention, the playground at /
    return Guard(app, GuardConfig(config.api_key, config.max_body_bytes), scheduler.metrics)


def serve(model_dir: str | Path, config: ServerConfig = ServerConfig(), provider: str = "cpu",
          threads: int | None = None) -> None:
    import uvicorn

    engine = Engine(model_dir, provider=provider, threads=threads, shares_cores=True)  # with the event loop
    app = create_app(engine, config)  # the FastAPI app inside the Guard holds the scheduler
    print(f"gpt2-onnx: serving {engine.model_dir} as {config.model_name or engine.model_dir.name!r} on "
          f"http://{config.host}:{config.port}/v1 (max batch {config.max_batch}; {app.app.state.scheduler.kv_summary})",
          flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=config.graceful_shutdown_s)
