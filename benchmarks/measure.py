"""Timed runs, alternating between systems, and their summaries (median and spread, p50/p90 per token)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .systems import Run, System

# Thread pools spin after their work (OpenMP's block time is ~200 ms): on a small machine the previous
# system's spinning threads would steal the next one's first milliseconds, inflating its prefill.
SETTLE_S = 0.3


@dataclass(frozen=True)
class Point:
    """One workload: `batch` prompts of `prompt` tokens, each continued by `new_tokens` greedy tokens."""

    batch: int
    prompt: int
    new_tokens: int

    @property
    def label(self) -> str:
        return f"batch {self.batch}, prompt {self.prompt}, {self.new_tokens} new"


def prompt_ids(point: Point, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The same token ids for every system: [batch, prompt], drawn once from a fixed seed, EOS-free."""
    rng = np.random.default_rng(seed + 1000 * point.batch + point.prompt)
    return rng.integers(0, min(vocab_size, 50000), size=(point.batch, point.prompt), dtype=np.int64)


def measure(systems: list[System], points: list[Point], reps: int, vocab_size: int,
            log: Callable[[str], None] = print) -> dict[tuple[str, Point], list[Run]]:
    """Each point: one warm-up run per system, then `reps` rounds in which every system runs once, the order
    reversed every other round (so no system always runs right after the same neighbour)."""
    runs: dict[tuple[str, Point], list[Run]] = {}
    for point in points:
        ids = prompt_ids(point, vocab_size)
        log(f"  {point.label}: warm-up, then {reps} alternating rounds")
        for system in systems:
            system.run(ids, min(point.new_tokens, 4))
        for rep in range(reps):
            for system in systems if rep % 2 == 0 else systems[::-1]:
                time.sleep(SETTLE_S)
                runs.setdefault((system.name, point), []).append(system.run(ids, point.new_tokens))
    return runs


def summarize(runs: list[Run], point: Point, weight_bytes: int) -> dict:
    """Prefill (first token) and per-token figures over all rounds of one system at one point."""
    first = np.array([r.step_times[0] for r in runs]) * 1e3
    gaps = np.concatenate([np.diff(r.step_times) for r in runs]) * 1e3 if point.new_tokens > 1 else np.zeros(0)
    decode_s = np.array([r.step_times[-1] - r.step_times[0] for r in runs])
    summary = {"point": asdict(point), "rounds": len(runs), "prefill_ms": spread(first)}
    if gaps.size:
        per_token_runs = decode_s * 1e3 / (point.new_tokens - 1)
        summary |= {
            "per_token_ms": {"p50": float(np.median(gaps)), "p90": float(np.percentile(gaps, 90)),
                             **spread(per_token_runs)},
            "decode_tokens_per_s": spread(point.batch * (point.new_tokens - 1) / decode_s),
            "end_to_end_tokens_per_s": spread(np.array([point.batch * point.new_tokens / r.step_times[-1] for r in runs])),
        }
        if point.batch == 1 and weight_bytes:
            summary["weight_gb_per_s"] = weight_bytes / (summary["per_token_ms"]["p50"] * 1e-3) / 1e9
    return summary


def spread(values: np.ndarray) -> dict:
    """Median, min and max: how the suite reports every repeated figure."""
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def median_ms(call: Callable[[], object], runs: int, warmup: int,
              before: Callable[[], object] | None = None) -> float:
    """`warmup` untimed calls, then the median of `runs` timed ones, in ms; `before`, if given, runs untimed
    ahead of every call (e.g. to empty the caches)."""
    times = []
    for i in range(warmup + runs):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)
