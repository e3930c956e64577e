"""`gpt2-onnx bench`: every system, every measurement, one run; reports in --out.

Stages: build or reuse the exports -> load every system -> latency and throughput runs (alternating) ->
the engine's kernel floors -> memory and cold start (a fresh process per system) -> the HTTP server under
load, and the engine alone on the same work -> parity -> JSON, Markdown and plots -> checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpt2_onnx.errors import Gpt2OnnxError

from . import ALL_SYSTEMS
from .exports import ExportCache
from .machine import machine_facts
from .measure import Point, measure, summarize
from .fidelity import engine_parity, greedy_agreement
from .kernel_floor import kernel_floors
from .serving import SERVED_PROMPT, serving_load
from .report import TARGETS, evaluate, write_reports
from .systems import System, make_systems

# a smoke run: all but the slowest to load, and one llama.cpp precision
QUICK_SYSTEMS = tuple(s for s in ALL_SYSTEMS if s not in ("optimum-fp32", "llamacpp-f32", "llamacpp-q4_0",
                                                          "llamacpp-q4_k_m"))


@dataclass(frozen=True)
class BenchConfig:
    source: str = "random:gpt2"
    out: Path = Path("bench-results")
    quick: bool = False  # fewer points, rounds and tokens: a smoke run in about two minutes
    threads: int = 2
    systems: tuple[str, ...] | None = None  # default: ALL_SYSTEMS (quick: QUICK_SYSTEMS)
    reps: int | None = None  # alternating rounds (default 5, quick 2)
    checks: tuple[str, ...] = ()
    eval_text: Path | None = None
    memory: bool = True  # the per-system process probes
    serving: bool = True  # the HTTP server under concurrent clients
    kernel_floors: bool = True  # the engine's weight products alone and its graph's fixed step cost
    cache: Path | None = None
    llama_cpp: Path | None = None  # an existing llama.cpp build (None: build the pinned one once, cached)
    llama_tools: bool = True  # llama.cpp's own llama-bench / llama-batched-bench beside the suite's timing of it
    command: str = "gpt2-onnx bench"

    @property
    def rounds(self) -> int:
        return self.reps or (2 if self.quick else 5)

    def latency_points(self, context: int) -> list[Point]:
        points = [Point(1, 32, 32), Point(1, 128, 16)] if self.quick else \
                 [Point(1, 32, 128), Point(1, 128, 32), Point(1, 512, 32), Point(1, 1000, 24)]
        return [p for p in points if p.prompt + p.new_tokens <= context]

    def throughput_points(self, context: int) -> list[Point]:
        batches = (4,) if self.quick else (1, 4, 16, 64)
        return [Point(b, 32, 16) for b in batches if 48 <= context]


@dataclass
class Suite:
    config: BenchConfig
    log: Callable[[str], None] = print
    results: dict = field(default_factory=dict)

    def run(self) -> dict:
        c = self.config
        started = time.perf_counter()
        log = self.log
        self.log = lambda line: log(f"{time.perf_counter() - started:6.1f}s {line}")
        cache = ExportCache(c.source, c.cache, log=self.log)
        self.log(f"[1/8] exports for {c.source} (cached)")
        names = c.systems or (QUICK_SYSTEMS if c.quick else ALL_SYSTEMS)
        systems, skipped = make_systems(list(names), cache, c.threads, llama_dir=c.llama_cpp)
        if not systems:
            raise Gpt2OnnxError(f"none of the systems {', '.join(names)} can run here: {skipped}")
        self.log(f"[2/8] loading {', '.join(s.name for s in systems)}" +
                 "".join(f"\n      skipped {name}: {why}" for name, why in skipped.items()))
        # before any system loads: the bandwidth probe puts the process's memory on huge pages, which must not
        # reach the peers' weights (each peer runs as its users get it; the engine does this itself)
        machine = machine_facts(c.threads)
        facts = {}
        for system in systems:
            start = time.perf_counter()
            system.load()
            facts[system.name] = {**system.notes, "load_s": time.perf_counter() - start,
                                  "weight_mb_per_token": system.weight_bytes / 1e6}
        model_config = json.loads((cache.checkpoint() / "config.json").read_text())
        context, vocab = model_config["n_positions"], model_config["vocab_size"]
        self.results = {"machine": machine, "config": {**asdict(c), "reps": c.rounds},
                        "systems": facts, "skipped": skipped}
        self.log("[3/8] latency and throughput")
        latency_points, throughput_points = c.latency_points(context), c.throughput_points(context)
        runs = measure(systems, latency_points + throughput_points, c.rounds, vocab, self.log)
        for key, points in (("latency", latency_points), ("throughput", throughput_points)):
            self.results[key] = {s.name: [summarize(runs[s.name, p], p, s.weight_bytes) for p in points]
                                 for s in systems}
        llamas = [s for s in systems if s.name.startswith("llamacpp-")]
        if llamas and c.llama_tools:
            self._llama_tools(llamas, latency_points, throughput_points)
        engines = [s for s in systems if s.name.startswith("engine-")]
        if c.kernel_floors and engines:
            self.log(f"[4/8] kernel floors of {', '.join(s.name for s in engines)}: their weight products alone, "
                     "and their graphs' fixed cost, for a step and a prompt")
            self.results["kernel_floor"] = kernel_floors({s.name: s.engine for s in engines}, c.threads, c.rounds,
                                                         30 if c.quick else 100)
        if c.memory:
            probed = [s for s in systems if s.name.startswith("engine-")] if c.quick else systems
            self.log(f"[5/8] memory and cold start, one process per system: {', '.join(s.name for s in probed)}")
            self.results["memory"] = {s.name: self._probe(s, cache, context, vocab) for s in probed}
        if c.serving and engines:
            served = next((s for s in engines if s.name == "engine-int8"), engines[0])
            self.log(f"[6/8] serving load on {served.name}")
            levels, new_tokens = (1, 4) if c.quick else (1, 8, 32), min(16 if c.quick else 128, context - 40)
            self.results["serving"] = {"system": served.name, "levels": serving_load(
                served.folder, c.threads, levels, 2 if c.quick else 4, new_tokens, vocab, log=self.log)}
            # the same work without HTTP or the scheduler: what the server's own costs are measured against
            same_work = Point(max(levels), SERVED_PROMPT, new_tokens)
            direct = measure([served], [same_work], c.rounds, vocab, self.log)[served.name, same_work]
            self.results["serving"]["direct"] = summarize(direct, same_work, served.weight_bytes)
        self.log("[7/8] parity with PyTorch")
        first = latency_points[0]
        self.results["parity"] = {
            "greedy_vs_pytorch": greedy_agreement({s.name: runs[s.name, first][0].tokens[0] for s in systems}),
            "engine": engine_parity(systems, cache.checkpoint(), c.eval_text, 4 if c.quick else 32, self.log,
                                    random_text=c.quick)}
        self.results["targets"] = [evaluate(self.results, f"{lhs}{op}{bound}") for lhs, op, bound in TARGETS]
        self.results["checks"] = [evaluate(self.results, check) for check in c.checks]
        self.results["elapsed_s"] = time.perf_counter() - started
        written = write_reports(self.results, Path(c.out))
        self.log(f"[8/8] wrote {', '.join(str(p) for p in written)} in {self.results['elapsed_s']:.0f} s")
        return self.results

    def _llama_tools(self, llamas: list[System], latency_points: list[Point], throughput_points: list[Point]) -> None:
        """llama.cpp's figures by its own tools and clock, as rows "<system> (llama.cpp tools)" beside the suite's."""
        from .llamacpp import llama_cpp
        from .llamacpp_bench import tool_results

        c = self.config
        self.log("      llama.cpp's own tools: llama-bench, llama-batched-bench")
        llama = llama_cpp(c.llama_cpp, log=self.log)
        for system in llamas:
            tools = tool_results(llama, system.folder / "model.gguf", latency_points, throughput_points, c.threads,
                                 c.rounds, self.log)
            self.results["latency"][f"{system.name} (llama.cpp tools)"] = tools["latency"]
            self.results["throughput"][f"{system.name} (llama.cpp tools)"] = tools["throughput"]
            self.results.setdefault("llamacpp_commands", []).extend(tools["commands"])

    def _probe(self, system: System, cache: ExportCache, context: int, vocab: int) -> dict:
        long_tokens = 64 if self.config.quick else min(1000, context - 40)
        spec = {"name": system.name, "folder": str(system.folder), "checkpoint": str(cache.checkpoint()),
                "threads": self.config.threads, "prompt": 32, "vocab_size": vocab, "spawned_at": time.time(),
                "long_tokens": long_tokens, "llama_cpp": str(self.config.llama_cpp) if self.config.llama_cpp else None}
        done = subprocess.run([sys.executable, "-m", "gpt2_onnx.benchmarks.probe", json.dumps(spec)],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        return json.loads(done.stdout.strip().splitlines()[-1])


def failed_checks(results: dict) -> list[dict]:
    return [c for c in results.get("checks", []) if not c["holds"]]
