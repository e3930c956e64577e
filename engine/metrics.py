"""Server metrics in Prometheus' text format: counters, gauges read on demand, and latency histograms.

Label values are escaped as the exposition format requires, and callers pass only bounded label sets
(route templates, status codes, finish reasons), so no client can forge a sample or grow the output.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HISTOGRAMS = ("request_latency_seconds", "time_to_first_token_seconds", "decode_step_seconds")


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


def escape(value: str) -> str:
    """A label value as Prometheus' text format writes it: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels_text(labels: tuple[tuple[str, str], ...]) -> str:
    """`{k="v",...}` (escaped), or nothing without labels."""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}" if labels else ""


class Metrics:
    """Thread-safe: the scheduler thread writes, the HTTP side reads."""

    def __init__(self, gauges: dict[str, Callable[[], float]]) -> None:
        self.lock = threading.Lock()
        self.gauges = gauges  # name -> current value, read when rendered
        self.counters: dict[tuple[str, tuple], float] = {}
        self.histograms = {name: Histogram() for name in HISTOGRAMS}

    def count(self, name: str, amount: float = 1, labels: dict[str, str] | None = None) -> None:
        key = (name, tuple(sorted((labels or {}).items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + amount

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            self.histograms[name].observe(seconds)

    def render(self, prefix: str = "gpt2_onnx") -> str:
        with self.lock:
            lines, typed = [], set()
            for (name, labels), value in sorted(self.counters.items()):
                if name not in typed:
                    lines.append(f"# TYPE {prefix}_{name} counter")
                    typed.add(name)
                lines.append(f"{prefix}_{name}{labels_text(labels)} {value:g}")
            for name, read in self.gauges.items():
                lines += [f"# TYPE {prefix}_{name} gauge", f"{prefix}_{name} {read():g}"]
            for name, histogram in self.histograms.items():
                lines += [f"# TYPE {prefix}_{name} histogram", *histogram.render(f"{prefix}_{name}")]
        return "\n".join(lines) + "\n"
