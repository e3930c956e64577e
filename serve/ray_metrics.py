"""The deployment's metrics at GET /metrics: every replica's counters summed, plus each replica's own.

A request to /metrics reaches one replica at random, so each replica sends a snapshot of its scheduler's
metrics every PUSH_PERIOD_S to one `MetricsBoard` (a second deployment of the same Ray Serve application,
one replica, no CPU), and /metrics renders the board's latest snapshots:

    gpt2_onnx_<name>{...}                      the sum over live replicas (the single-process server's names,
                                               so its dashboards and alerts work unchanged)
    gpt2_onnx_replica_<name>{replica="..."}    each replica's counters and gauges
    gpt2_onnx_replica_info{replica,pid,node} 1 which process and node each replica is

Sums of gauges: `alive` counts live replicas, `max_batch` the deployment's batch capacity. A replica not
heard from for STALE_S (its process died) leaves the sums: counters are per process and restart at zero, as
Prometheus' rate() expects. Ray's own Prometheus export (serve_* request counts and latencies per replica)
is there as well, on each node's metrics port.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpt2_onnx.engine.metrics import Histogram, Metrics, escape, labels_text

PUSH_PERIOD_S = 0.5
STALE_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    replica: str
    pid: int
    node: str
    taken: float  # time.time()
    counters: dict[tuple[str, tuple], float]
    gauges: dict[str, float]
    histograms: dict[str, tuple[list[int], float]]  # name -> (bucket counts, sum)


def snapshot(metrics: Metrics, replica: str, node: str) -> Snapshot:
    gauges = {name: float(read()) for name, read in metrics.gauges.items()}
    with metrics.lock:
        counters = dict(metrics.counters)
        histograms = {name: (list(h.counts), h.total) for name, h in metrics.histograms.items()}
    return Snapshot(replica, os.getpid(), node, time.time(), counters, gauges, histograms)


def render(snapshots: list[Snapshot], prefix: str = "gpt2_onnx") -> str:
    """Prometheus text: the sums under the usual names, then one labelled series per replica."""
    snapshots = sorted(snapshots, key=lambda s: s.replica)
    gauge_names = sorted({name for s in snapshots for name in s.gauges})
    total = Metrics(gauges={name: _summed(snapshots, name) for name in gauge_names})
    for s in snapshots:
        for key, value in s.counters.items():
            total.counters[key] = total.counters.get(key, 0) + value
        for name, (counts, seconds) in s.histograms.items():
            histogram = total.histograms.setdefault(name, Histogram())
            histogram.counts = [a + b for a, b in zip(histogram.counts, counts)]
            histogram.total += seconds
    lines = [total.render(prefix).rstrip("\n"), f"# TYPE {prefix}_replicas gauge", f"{prefix}_replicas {len(snapshots)}"]
    lines += _per_replica(snapshots, f"{prefix}_replica")
    return "\n".join(lines) + "\n"


def _summed(snapshots: list[Snapshot], name: str) -> Callable[[], float]:
    value = sum(s.gauges.get(name, 0.0) for s in snapshots)
    return lambda: value


def _per_replica(snapshots: list[Snapshot], prefix: str) -> list[str]:
    lines = [f"# TYPE {prefix}_info gauge"]
    lines += [f'{prefix}_info{{replica="{escape(s.replica)}",pid="{s.pid}",node="{escape(s.node)}"}} 1'
              for s in snapshots]
    series: dict[str, list[str]] = {}
    for s in snapshots:
        replica = ("replica", s.replica)
        for (name, labels), value in sorted(s.counters.items()):
            series.setdefault(f"counter {name}", []).append(f"{prefix}_{name}{labels_text((replica, *labels))} {value:g}")
        for name, value in s.gauges.items():
            series.setdefault(f"gauge {name}", []).append(f"{prefix}_{name}{labels_text((replica,))} {value:g}")
    for kind_name, samples in series.items():
        kind, name = kind_name.split(" ")
        lines += [f"# TYPE {prefix}_{name} {kind}", *samples]
    return lines



class Board:
    """The latest snapshot of each replica (the body of the MetricsBoard deployment)."""

    def __init__(self) -> None:
        self.latest: dict[str, Snapshot] = {}

    def put(self, snap: Snapshot) -> None:
        # The replica's pusher and its /metrics handler both send: one taken earlier may land later, and a
        # counter must never step back (Prometheus would read a restart)
        held = self.latest.get(snap.replica)
        if held is None or snap.taken >= held.taken:
            self.latest[snap.replica] = snap

    def render(self) -> str:
        now = time.time()
        self.latest = {k: s for k, s in self.latest.items() if now - s.taken < STALE_S}
        return render(list(self.latest.values()))


class Pusher:
    """A daemon thread that sends `take()` to `send` every PUSH_PERIOD_S until stopped; a failed send (the
    board restarting) is retried at the next period."""

    def __init__(self, take: Callable[[], Snapshot], send: Callable[[Snapshot], None]) -> None:
        self.take, self.send = take, send
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpt2-onnx-metrics-push", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(PUSH_PERIOD_S):
            try:
                self.send(self.take())
            except Exception:  # noqa: BLE001 - the board is being restarted; the next push refills it
                pass

