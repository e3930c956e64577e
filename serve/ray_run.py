"""`gpt2-onnx serve MODEL_DIR --ray`: start (or join) Ray, run the application, stop on SIGINT/SIGTERM.

Without --ray-address it starts a local Ray instance of its own (no dashboard, a small object store: the
weights never travel through it) and shuts Serve and that instance down on exit. With one it joins an
existing cluster (`ray start --head` on one machine, `ray start --address HEAD:6379` on the others) and on
exit deletes only its own application, leaving the cluster and any other applications running.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpt2_onnx.errors import Gpt2OnnxError

from .app import ServerConfig

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # requests and snapshots only; the weights are read from disk
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Ray Serve logs each request at INFO otherwise


@dataclass(frozen=True)
class RayRun:
    model_dir: str
    server: ServerConfig
    threads: int = 1
    replicas: int = 1
    autoscale: str | None = None  # "MIN:MAX"
    address: str | None = None  # None: start a local Ray
    provider: str = "cpu"


def serve_on_ray(run: RayRun) -> None:
    try:
        import ray
        from ray import serve

        from .ray_app import APP_NAME, RaySpec, application, parse_autoscale
    except ImportError as exc:
        raise Gpt2OnnxError(f"--ray needs the `ray` extra ({exc.name} is missing): pip install 'gpt2-onnx[ray]'") \
            from None
    folder = Path(run.model_dir).resolve()
    if not folder.is_dir():
        raise Gpt2OnnxError(f"model folder {folder} does not exist; give the folder written by `gpt2-onnx export`")
    spec = RaySpec(str(folder), run.server, threads=run.threads, replicas=run.replicas, provider=run.provider,
                   autoscale=parse_autoscale(run.autoscale) if run.autoscale else None)
    if run.address:
        ray.init(address=run.address, logging_level="WARNING")
    else:
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level="WARNING")
    stop = _stop_on_signals()  # after ray.init, which installs handlers of its own
    try:
        serve.start(http_options={"host": run.server.host, "port": run.server.port}, logging_config=QUIET)
        try:
            serve.run(application(spec), name=APP_NAME, route_prefix="/", logging_config=QUIET)
        except RuntimeError as exc:  # Ray's message carries each replica's traceback: keep the last line
            raise Gpt2OnnxError(f"the Ray Serve application did not start: {_last_line(exc)}") from None
        count = f"{spec.autoscale[0]}..{spec.autoscale[1]}" if spec.autoscale else str(spec.replicas)
        print(f"gpt2-onnx: serving {folder} on Ray as {run.server.model_name or folder.name!r} at "
              f"http://{run.server.host}:{run.server.port}/v1 ({count} replica(s) x {run.threads} thread(s))",
              flush=True)
        stop.wait()
    finally:
        _shut_down(run.address is None)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    return stop


def _shut_down(local: bool) -> None:
    """In-flight requests get the deployment's graceful_shutdown_timeout_s, then the rest are cancelled."""
    import ray
    from ray import serve

    from .ray_app import APP_NAME

    started = time.monotonic()
    if ray.is_initialized():
        serve.delete(APP_NAME)  # waits for the replicas to drain while the proxies still carry their streams
        if local:
            serve.shutdown()  # kills the proxies at once: only after the application is gone
        ray.shutdown()
    print(f"gpt2-onnx: stopped in {time.monotonic() - started:.1f} s", flush=True)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
