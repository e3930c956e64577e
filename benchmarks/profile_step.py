"""Where one decode step's time goes, and quick A/B timings of an export folder.

    python -m benchmarks.profile_step MODEL_DIR [--batch 1] [--steps 64] [--profile] [--threads 2]
        [--config KEY=VALUE ...] [--no-huge-pages]

Times a 32-token prefill and `--steps` decode steps at `--batch` rows (median of the steps), through the
engine's own SharedBufferDecoder and session options; `--config` adds onnxruntime session config entries
(e.g. session.intra_op.allow_spinning=0) for A/B runs; the weights go on huge pages as the engine's do
unless `--no-huge-pages`. With `--profile` onnxruntime's profiler records the
decode steps and the per-op-type totals per step are printed (the profiler's own overhead inflates the
small ops a little: read the shares, not the sum).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gpt2_onnx.engine.decoders import SharedBufferDecoder
from gpt2_onnx.engine.hugepages import collapse_populated_memory, huge_pages_wanted
from gpt2_onnx.engine.manifest import MODEL_FILE, Manifest
from gpt2_onnx.engine.session import session_options

from .measure import median_ms

WARMUP = 8  # decode steps before timing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--config", action="append", default=[], help="session config entry KEY=VALUE")
    parser.add_argument("--no-huge-pages", action="store_true", help="leave the weights on the pages they load on")
    args = parser.parse_args()

    manifest = Manifest.read(args.model_dir)
    options = session_options(args.threads)
    for entry in args.config:
        key, value = entry.split("=", 1)
        options.add_session_config_entry(key, value)
    huge_pages = huge_pages_wanted(False if args.no_huge_pages else None)  # as the engine decides
    session = load(args.model_dir, options, huge_pages)
    decoder = SharedBufferDecoder(session, manifest)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, manifest.vocab_size, args.prompt)) for _ in range(args.batch)]
    max_length = args.prompt + 2 * args.steps + 8

    prefill = []
    for _ in range(3):
        decoder.allocate(args.batch, max_length)
        start = time.perf_counter()
        decoder.add(prompts[0])
        prefill.append(time.perf_counter() - start)
        for prompt in prompts[1:]:
            decoder.add(prompt)
    tokens = np.zeros(args.batch, np.int64)
    if args.profile:  # a profiling session of its own, so the profile holds only what is reported
        options.enable_profiling = True
        options.profile_file_prefix = "/tmp/profile_step"
        session = load(args.model_dir, options, huge_pages)
        decoder = SharedBufferDecoder(session, manifest)
        decoder.allocate(args.batch, max_length)
        for prompt in prompts:
            decoder.add(prompt)
    step_ms = median_ms(lambda: decoder.decode(tokens), args.steps, WARMUP)
    print(json.dumps({"model": str(args.model_dir), "batch": args.batch, "config": args.config,
                      "huge_pages": huge_pages,
                      "prefill_ms": round(min(prefill) * 1e3, 2), "step_ms": round(step_ms, 3),
                      "tok_s": round(args.batch / step_ms * 1e3, 1)}))
    if args.profile:
        report(Path(session.end_profiling()), args.steps + WARMUP + len(prompts))


def load(model_dir: Path, options: ort.SessionOptions, huge_pages: bool) -> ort.InferenceSession:
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    if huge_pages:
        collapse_populated_memory()
    return session


def report(path: Path, runs: int) -> None:
    events = json.loads(path.read_text())
    per_type: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    model_runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_type[event["args"]["op_name"]] += event["dur"]
            counts[event["args"]["op_name"]] += 1
    # the profile holds the prefills too: keep decode steps only (the shortest runs)
    decode_runs = sorted(model_runs)[:runs - 1]
    print(f"profile {path}: model_run median {np.median(decode_runs) / 1e3:.3f} ms over {len(decode_runs)} runs")
    total = sum(per_type.values())
    for op, dur in sorted(per_type.items(), key=lambda kv: -kv[1]):
        print(f"  {op:28s} {dur / len(model_runs) / 1e3:7.3f} ms/run  {counts[op] // len(model_runs):3d} nodes  "
              f"{100 * dur / total:5.1f}%")
    path.unlink()


if __name__ == "__main__":
    main()
