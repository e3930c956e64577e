"""One system in a fresh process: cold start to the first token, peak memory, memory growth over a long run.

    python -m gpt2_onnx.benchmarks.probe '{"name": ..., "folder": ..., "checkpoint": ..., "threads": 2,
                                           "prompt": 32, "long_tokens": 984, "vocab_size": 50257,
                                           "spawned_at": <time.time()>}'

Prints one JSON line. Resident memory is sampled every few milliseconds while each generation runs, so
`rss_growth_long_vs_10_mb` is what a long sequence costs beyond a short one (for the engine: its KV buffer,
whose size is reported beside it). The process's overall high-water mark (VmHWM) is `peak_rss_mb`.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (resident at most) of this process, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0


class RssSampler:
    """The largest resident size seen while a `with` block runs."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s, self.largest, self.done = every_s, 0.0, threading.Event()

    def __enter__(self) -> RssSampler:
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.largest = max(self.largest, status_mb("VmRSS"))

    def _sample(self) -> None:
        while not self.done.wait(self.every_s):
            self.largest = max(self.largest, status_mb("VmRSS"))


def main(spec: dict) -> dict:
    from .measure import Point, prompt_ids
    from .systems import system_from_spec

    imported = time.time()
    system = system_from_spec(spec)
    system.load()
    loaded = time.time()
    ids = prompt_ids(Point(1, spec["prompt"], 1), vocab_size=spec["vocab_size"])
    first = system.run(ids, 1)
    child = "peak_rss_mb" in system.notes  # llama.cpp: the model and its memory live in its driver process
    report = {"import_s": imported - spec["spawned_at"], "load_s": loaded - imported,
              "cold_start_s": loaded + first.step_times[0] - spec["spawned_at"],
              "rss_after_load_mb": system.notes["rss_mb"] if child else status_mb("VmRSS")}
    with RssSampler() as short:
        system.run(ids, 10)
    report["rss_during_10_tokens_mb"] = system.notes["peak_rss_mb"] if child else short.largest
    if spec["long_tokens"] > 10:
        with RssSampler() as long:
            system.run(ids, spec["long_tokens"])
        largest = system.notes["peak_rss_mb"] if child else long.largest
        report[f"rss_during_{spec['long_tokens']}_tokens_mb"] = largest
        report["rss_growth_long_vs_10_mb"] = largest - report["rss_during_10_tokens_mb"]
        if spec["name"].startswith("engine-"):  # [layers x K and V x (prompt + new) x width] of the cache's type
            manifest = system.engine.manifest
            tokens = spec["prompt"] + spec["long_tokens"]
            item = np.dtype(manifest.io.kv_dtype).itemsize
            report["kv_buffer_mb"] = 2 * manifest.n_layer * tokens * manifest.n_embd * item / 2**20
    report["peak_rss_mb"] = system.notes["peak_rss_mb"] if child else status_mb("VmHWM")
    return report


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
