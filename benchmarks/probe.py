"""One system in a fresh process: cold start to the first token, peak memory, memory growth over a long run.

    python -m gpt2_onnx.benchmarks.probe '{"name": ..., "folder": ..., "checkpoint": ..., "threads": 2,
                                           "prompt": 32, "long_tokens": 990, "spawned_at": <time.time()>}'

Prints one JSON line. Peak resident memory is the kernel's high-water mark (VmHWM), read after loading,
after a 10-token generation and after a long one, so the growth between the last two is what a long
sequence costs (for the engine: its KV buffer).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    """This process's resident high-water mark. (getrusage's ru_maxrss is no use here: Linux carries it over
    from the parent across fork and exec, so a child started by a big parent reports the parent's peak.)"""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(spec: dict) -> dict:
    from .measure import Point, prompt_ids
    from .systems import system_from_spec

    imported = time.time()
    system = system_from_spec(spec)
    system.load()
    loaded = time.time()
    ids = prompt_ids(Point(1, spec["prompt"], 1), vocab_size=spec["vocab_size"])
    first = system.run(ids, 1)
    first_token = loaded + first.step_times[0]
    report = {"import_s": imported - spec["spawned_at"], "load_s": loaded - imported,
              "cold_start_s": first_token - spec["spawned_at"], "peak_rss_after_load_mb": peak_rss_mb()}
    system.run(ids, 10)
    report["peak_rss_after_10_tokens_mb"] = peak_rss_mb()
    if spec["long_tokens"] > 10:
        system.run(ids, spec["long_tokens"])
        report[f"peak_rss_after_{spec['long_tokens']}_tokens_mb"] = peak_rss_mb()
        report["rss_growth_long_vs_10_mb"] = peak_rss_mb() - report["peak_rss_after_10_tokens_mb"]
    return report


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
