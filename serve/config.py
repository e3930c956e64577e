"""The server's settings, in a module of their own: the CLI reads their defaults without importing fastapi."""

from __future__ import annotations

from dataclasses import dataclass

from gpt2_onnx.engine.scheduler import SchedulerConfig

DEFAULTS = SchedulerConfig()


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the server has no TLS
    port: int = 8000
    max_batch: int = DEFAULTS.max_batch
    max_queue: int = DEFAULTS.max_queue
    api_key: str | None = None
    model_name: str | None = None  # default: the model folder's name
    graceful_shutdown_s: float = 10.0  # in-flight requests get this long to finish, then are cancelled
    max_body_bytes: int = 4 * 1024 * 1024
    max_rows_per_request: int = 64  # prompts x n
    request_timeout_s: float = 600.0
    kv_huge_pages: bool | None = DEFAULTS.kv_huge_pages  # None: where affordable (engine/scheduler.py)
