"""Server metrics in Prometheus' text format: counters, gauges read on demand, and latency histograms."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return lines + [f"{name}_sum {self.total:.6f}", f"{name}_count {running}"]


class Metrics:
    """Thread-safe: the scheduler thread writes, the HTTP side reads."""

    def __init__(self, gauges: dict[str, Callable[[], float]]) -> None:
        self.lock = threading.Lock()
        self.gauges = gauges  # name -> current value, read when rendered
        self.counters: dict[str, float] = {}
        self.histograms = {name: Histogram() for name in
                           ("request_latency_seconds", "time_to_first_token_seconds", "decode_step_seconds")}

    def count(self, name: str, amount: float = 1) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + amount

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            self.histograms[name].observe(seconds)

    def render(self, prefix: str = "gpt2_onnx") -> str:
        with self.lock:
            lines, typed = [], set()
            for name, value in sorted(self.counters.items()):  # "requests_total{status=\"200\"}": one TYPE line a base
                base = name.partition("{")[0]
                if base not in typed:
                    lines.append(f"# TYPE {prefix}_{base} counter")
                    typed.add(base)
                lines.append(f"{prefix}_{name} {value:g}")
            for name, read in self.gauges.items():
                lines += [f"# TYPE {prefix}_{name} gauge", f"{prefix}_{name} {read():g}"]
            for name, histogram in self.histograms.items():
                lines += [f"# TYPE {prefix}_{name} histogram", *histogram.render(f"{prefix}_{name}")]
        return "\n".join(lines) + "\n"
