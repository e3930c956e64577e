"""The OpenAI server as a Ray Serve application: N replicas behind Ray's HTTP proxy (one per node).

    client ──► Ray Serve proxy ──► Gpt2OnnxReplica × N   each: Engine(threads=k) + Scheduler + create_app()
                                        │  metrics snapshot every 0.5 s
                                        ▼
                                   MetricsBoard × 1  ◄── GET /metrics (any replica): the whole deployment

Each replica's ASGI app is the one `serve.app.create_app` builds for the single-process server (same
routes, validation, errors, streaming, logprobs, API key, metrics): Ray Serve's late-bound ingress
(`@serve.ingress()` + `__serve_build_asgi_app__`) asks each replica for its app after the constructor has
loaded the engine. Ray reserves `threads` CPUs per replica (`ray_actor_options`) and the engine runs that
many onnxruntime threads. The model folder is read from the same path on every node (a shared file
system or a copy): exports are 100 MB to 6 GB, which Ray's object store would copy into every node's
shared memory on each start. A replica whose scheduler thread has died fails `check_health`, and Ray
replaces it.

`build` is the application builder for `serve run` / `serve deploy` YAML (docs/ray-serve.yaml).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray import serve
from ray.serve import Application

from gpt2_onnx.engine import Engine
from gpt2_onnx.errors import Gpt2OnnxError

from .app import ServerConfig, create_app
from .ray_metrics import Board, Pusher, Snapshot, snapshot

APP_NAME = "gpt2-onnx"
DEPLOYMENT = "gpt2-onnx"


@dataclass(frozen=True)
class RaySpec:
    model_dir: str  # absolute, and the same path on every node
    server: ServerConfig = field(default_factory=ServerConfig)
    threads: int = 1  # CPUs Ray reserves for each replica = its onnxruntime intra-op threads
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces `replicas`
    provider: str = "cpu"
    health_check_period_s: float = 2.0

    def __post_init__(self) -> None:
        if self.threads < 1 or self.replicas < 1:
            raise Gpt2OnnxError(f"threads ({self.threads}) and replicas ({self.replicas}) must be >= 1")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise Gpt2OnnxError(f"--autoscale {self.autoscale[0]}:{self.autoscale[1]} needs 0 <= MIN <= MAX and "
                                "MAX >= 1, e.g. --autoscale 1:4")

    def deployment_options(self) -> dict:
        """Ray Serve's options for the replicas' deployment."""
        options = dict(
            ray_actor_options={"num_cpus": self.threads},
            # a request waits in Ray's router only past what the scheduler itself queues (then 429s)
            max_ongoing_requests=self.server.max_batch + self.server.max_queue,
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=30.0,
            graceful_shutdown_timeout_s=self.server.graceful_shutdown_s,  # in-flight requests may finish
            graceful_shutdown_wait_loop_s=0.5,
        )
        if self.autoscale is None:
            return {**options, "num_replicas": self.replicas}
        low, high = self.autoscale
        return {**options, "num_replicas": "auto", "autoscaling_config": {
            "min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
            "target_ongoing_requests": self.server.max_batch}}  # one full batch per replica


def parse_autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise Gpt2OnnxError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4; got {text!r}")
    return int(low), int(high)


@serve.deployment(name="metrics-board", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class MetricsBoard(Board):
    """One per application: the replicas' latest metrics snapshots (serve/ray_metrics.py)."""


@serve.ingress()
class Gpt2OnnxReplica:
    """One engine and its continuous-batching scheduler behind create_app's ASGI app."""

    def __init__(self, spec: RaySpec, board) -> None:
        self.spec, self.board = spec, board
        self.engine = load_engine(spec)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.node = os.uname().nodename
        self.scheduler = self.pusher = None  # (`app` is Ray's: the wrapper's property)

    def __serve_build_asgi_app__(self):
        guard = create_app(self.engine, self.spec.server, metrics_text=self.cluster_metrics)
        self.scheduler = guard.app.state.scheduler  # Guard -> FastAPI app -> its scheduler
        self.pusher = Pusher(self.snapshot, lambda snap: self.board.put.remote(snap).result(timeout_s=5))
        self.pusher.start()
        return guard

    def snapshot(self) -> Snapshot:
        return snapshot(self.scheduler.metrics, self.replica, self.node)

    async def cluster_metrics(self) -> str:
        """Every live replica's metrics, this one's as of now."""
        try:
            await self.board.put.remote(self.snapshot())
            return await self.board.render.remote()
        except Exception as exc:  # noqa: BLE001 - the board is restarting: this replica's own, and say so
            note = f"# the deployment's metrics are unavailable ({type(exc).__name__}); this replica's only\n"
            return note + self.scheduler.metrics.render()

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes it replace the replica."""
        if self.scheduler is not None and not self.scheduler.alive:
            raise RuntimeError(self.scheduler.death or "the scheduler has stopped")

    def __del__(self) -> None:
        if getattr(self, "pusher", None) is not None:
            self.pusher.stop()


def load_engine(spec: RaySpec) -> Engine:
    try:
        return Engine(spec.model_dir, provider=spec.provider, threads=spec.threads, shares_cores=True)
    except Gpt2OnnxError as exc:
        raise Gpt2OnnxError(f"on node {os.uname().nodename}: {exc}. Every Ray node reads the model from the same "
                            "path: put it on a shared file system or copy it to each node") from None


def application(spec: RaySpec) -> Application:
    """The Ray Serve application: the replicas, and the metrics board they report to."""
    replicas = serve.deployment(Gpt2OnnxReplica, name=DEPLOYMENT, **spec.deployment_options())
    return replicas.bind(spec, MetricsBoard.bind())


def build(args: dict) -> Application:
    """Application builder for `serve run` / `serve deploy` (docs/ray-serve.yaml):

        import_path: gpt2_onnx.serve.ray_app:build
        args: {model_dir: /shared/models/gpt2, replicas: 2, threads: 1, max_batch: 16, api_key: ...}

    Keys: model_dir (required), replicas, autoscale ("MIN:MAX"), threads, provider, and any ServerConfig field
    (max_batch, max_queue, api_key, model_name, ...; host and port come from the YAML's http_options)."""
    if "model_dir" not in args:
        raise Gpt2OnnxError("the application's args need model_dir: the export folder, the same path on every node")
    spec_keys = {"replicas", "threads", "provider"}
    server_keys = set(asdict(ServerConfig())) - {"host", "port"}
    unknown = set(args) - spec_keys - server_keys - {"model_dir", "autoscale"}
    if unknown:
        raise Gpt2OnnxError(f"unknown application arg(s) {sorted(unknown)}; use {sorted(spec_keys | server_keys)}, "
                            "model_dir or autoscale")
    autoscale = args.get("autoscale")
    server = ServerConfig(**{k: v for k, v in args.items() if k in server_keys})
    return application(RaySpec(str(Path(args["model_dir"]).resolve()), server, threads=int(args.get("threads", 1)),
                               replicas=int(args.get("replicas", 1)), provider=str(args.get("provider", "cpu")),
                               autoscale=parse_autoscale(str(autoscale)) if autoscale else None))
