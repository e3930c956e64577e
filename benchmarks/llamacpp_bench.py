"""llama.cpp's own benchmark tools, run on the suite's GGUF files and read into the suite's terms.

`llama-bench -p L -n 0 -o json` gives the prefill of L tokens, `llama-bench -p 0 -n N -d L -o json` the time
per token of N tokens generated after L; `llama-batched-bench -npp 32 -ntg 16 -npl 1,4,16,64
--output-format jsonl` gives decode tokens/s over all rows at each batch size. Each becomes a summary shaped
like `measure.summarize`'s (prefill_ms, per_token_ms, decode_tokens_per_s with median/min/max), so the
report's tables and `--check` read them like any system's. These are llama.cpp's numbers by llama.cpp's
clock, a cross-check on the suite's own timing of llama.cpp (LlamaCppSystem, in the alternating rounds).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError

from .llamacpp import LlamaCpp
from .measure import Point, spread


@dataclass(frozen=True)
class BenchRow:
    """One llama-bench test: `n_prompt` prompt tokens or `n_gen` generated ones, after `n_depth` in the cache."""

    n_prompt: int
    n_gen: int
    n_depth: int
    samples_ns: tuple[int, ...]  # one total per repetition


@dataclass(frozen=True)
class BatchedRow:
    """One llama-batched-bench line: `pl` rows of `pp` prompt tokens each, then `tg` decode steps."""

    pp: int
    tg: int
    pl: int
    t_pp: float  # seconds, all rows' prompts
    t_tg: float  # seconds, all decode steps
    speed_tg: float  # decode tokens/s over all rows


def llama_bench_commands(llama: LlamaCpp, model: Path, threads: int, prompt: int, new_tokens: int,
                         reps: int) -> list[list[str]]:
    """Two runs: the prefill of `prompt` tokens into an empty cache, then `new_tokens` generated after `prompt`
    (one run with -d 0,L would also test the prompt at depth L: 2L positions, past GPT-2's table for L > 512)."""
    tool = [str(llama.tool("llama-bench")), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json"]
    return [tool + ["-p", str(prompt), "-n", "0", "-d", "0"], tool + ["-p", "0", "-n", str(new_tokens), "-d", str(prompt)]]


def batched_bench_command(llama: LlamaCpp, model: Path, threads: int, prompt: int, new_tokens: int,
                          batches: Sequence[int]) -> list[str]:
    context = max(batches) * (prompt + new_tokens)  # every row its own cells
    return [str(llama.tool("llama-batched-bench")), "-m", str(model), "-t", str(threads), "-c", str(context),
            "-npp", str(prompt), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)),
            "--output-format", "jsonl"]


def parse_llama_bench(text: str) -> list[BenchRow]:
    """llama-bench's `-o json` output: a list of tests."""
    return [BenchRow(int(t["n_prompt"]), int(t["n_gen"]), int(t.get("n_depth", 0)), tuple(map(int, t["samples_ns"])))
            for t in json.loads(text)]


def parse_batched_bench(text: str) -> list[BatchedRow]:
    """llama-batched-bench's `--output-format jsonl` output: one JSON object a line (other lines ignored)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows.append(BatchedRow(int(r["pp"]), int(r["tg"]), int(r["pl"]), float(r["t_pp"]), float(r["t_tg"]),
                                   float(r["speed_tg"])))
    return rows


def latency_summary(rows: list[BenchRow], point: Point, weight_bytes: int = 0) -> dict:
    """Prefill of `point.prompt` tokens and ms per token at that context, from llama-bench's tests.
    p50/p90 are over repetitions' averages: llama-bench times whole runs, not single steps."""
    prefill = _find(rows, n_prompt=point.prompt, n_gen=0, n_depth=0)
    decode = _find(rows, n_prompt=0, n_gen=point.new_tokens, n_depth=point.prompt)
    per_token = np.array(decode.samples_ns) / 1e6 / decode.n_gen
    return {"point": _point(point), "rounds": len(per_token), "source": "llama-bench",
            "prefill_ms": spread(np.array(prefill.samples_ns) / 1e6),
            "per_token_ms": {"p50": float(np.median(per_token)), "p90": float(np.percentile(per_token, 90)),
                             **spread(per_token)},
            "decode_tokens_per_s": spread(1e3 / per_token)} | \
        ({"weight_gb_per_s": weight_bytes / (float(np.median(per_token)) * 1e-3) / 1e9} if weight_bytes else {})


def throughput_summary(runs: list[list[BatchedRow]], point: Point) -> dict:
    """Decode tokens/s over all rows at `point.batch`, over several llama-batched-bench runs."""
    found = [r for run in runs for r in run if (r.pl, r.pp, r.tg) == (point.batch, point.prompt, point.new_tokens)]
    if not found:
        raise Gpt2OnnxError(f"llama-batched-bench printed no result for {point.label}: "
                            "its context (-c) may be too small; run its command by hand to see why")
    return {"point": _point(point), "rounds": len(found), "source": "llama-batched-bench",
            "prefill_ms": spread(np.array([r.t_pp for r in found]) * 1e3),
            "decode_tokens_per_s": spread(np.array([r.speed_tg for r in found]))}


def tool_results(llama: LlamaCpp, model: Path, latency_points: list[Point], throughput_points: list[Point],
                 threads: int, reps: int, log: Callable[[str], None] = print) -> dict:
    """llama.cpp's tools on `model` at the suite's points: {"latency": [...], "throughput": [...], "commands"},
    the summaries shaped like `measure.summarize`'s, with "source" naming the tool."""
    from .llamacpp import weight_bytes as weight_bytes_of

    weight_bytes = weight_bytes_of(model)
    out: dict = {"latency": [], "throughput": [], "commands": []}
    for point in latency_points:
        assert point.batch == 1, f"llama-bench times one sequence, got {point.label}"
        commands = llama_bench_commands(llama, model, threads, point.prompt, point.new_tokens, reps)
        rows = [row for command in commands for row in parse_llama_bench(_run(command, log))]
        out["latency"].append(latency_summary(rows, point, weight_bytes))
        out["commands"] += [" ".join(command) for command in commands]
    by_shape: dict[tuple[int, int], list[Point]] = {}
    for point in throughput_points:
        by_shape.setdefault((point.prompt, point.new_tokens), []).append(point)
    for (prompt, new_tokens), points in by_shape.items():
        command = batched_bench_command(llama, model, threads, prompt, new_tokens, [p.batch for p in points])
        runs = [parse_batched_bench(_run(command, log)) for _ in range(reps)]
        out["throughput"] += [throughput_summary(runs, p) for p in points]
        out["commands"].append(" ".join(command) + f"  (x{reps})")
    return out


def _run(command: list[str], log: Callable[[str], None]) -> str:
    log(f"  {Path(command[0]).name} {' '.join(command[3:])}")  # the model path left out
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise Gpt2OnnxError(f"{Path(command[0]).name} failed (exit {done.returncode}): "
                            f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return done.stdout


def _find(rows: list[BenchRow], **want: int) -> BenchRow:
    for row in rows:
        if all(getattr(row, k) == v for k, v in want.items()):
            return row
    raise Gpt2OnnxError(f"llama-bench printed no test with {want}; got {[(r.n_prompt, r.n_gen, r.n_depth) for r in rows]}")


def _point(point: Point) -> dict:
    return {"batch": point.batch, "prompt": point.prompt, "new_tokens": point.new_tokens}
