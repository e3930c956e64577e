"""The batched graph: a second graph over the same KV cache, for passes of many tokens.

MatMulNBits (4-bit blocks, or 8-bit blocks) streams the weights fastest one token at a time, but it
dequantizes per block of every row, so a 32-token prompt or a 16-row decode step costs it up to twice
what onnxruntime's int8 DynamicQuantizeMatMul (integer dot products over whole rows) needs. So an
export whose blocks use MatMulNBits also writes the int8 graph into `batched/`: same inputs, outputs
and cache layout, so either graph can run any step over the same KV buffer (engine/decoders.py).

From how many tokens the batched graph wins depends on the CPU (VNNI or not, its cache, its memory),
so it is measured here, on the machine that exports: prompts of each length in LENGTHS through both
graphs, alternating, the fastest of REPEATS runs each (the fastest, not the median: a neighbour's load
only ever adds time). The threshold is the shortest length from which the batched graph is faster at
every longer length measured; if it never is, the folder is removed and the export has none.
Costs: the int8 weights on disk and in memory beside the main graph's (stated in the manifest's sizes).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from gpt2_onnx.engine.decoders import SharedBufferDecoder
from gpt2_onnx.engine.manifest import BATCHED_FOLDER

from .quantize import QuantConfig

LENGTHS = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 7


def wants_batched_graph(quant: QuantConfig) -> bool:
    """MatMulNBits blocks (int4, or int8 with that kernel) gain from an int8 graph for wide passes."""
    uses_nbits = quant.block_bits == 4 or (quant.block_bits == 8 and quant.int8_kernel == "MatMulNBits")
    return quant.batched_graph and uses_nbits


def batched_recipe(quant: QuantConfig) -> QuantConfig:
    """int8 DynamicQuantizeMatMul blocks (whatever this CPU's int8 default); the LM head and embedding as the
    main graph stores them, with its shortlist. A prompt's one logits row then reads the 4-bit table instead of
    the 8-bit one: gpt2 int4, 32-token prompts, 80 alternating rounds in one process, first token 17.99 against
    18.55 ms (medians; the head alone 0.69-0.93 against 1.32 ms in onnxruntime's profiler), for a 4-bit table
    of 19 MB more on disk and in memory (measured at 0.5-0.8 ms before and then not taken; the prompt against
    llama.cpp's Q4_0 is the issue's target). An 8-bit head has the wide head too (lm_head.py): 38.6 MB more for
    gpt2; int4 gpt2, interleaved call by call, 40 calls each: a 16-row step 14.4 ms against 15.8 (medians), a
    32-row one 24.8 against 27.5."""
    return replace(QuantConfig.int8(block_size=quant.block_size, kernel="DynamicQuantizeMatMul"),
                   lm_head_bits=quant.head_bits or 32, head_shortlist=quant.shortlist, batched_graph=False,
                   kv_cache=quant.kv_cache, wide_head=True)


def add_batched_graph(model, work: Path, quant: QuantConfig, manifest, log, kv_scales: dict | None = None) -> dict:
    """Write the int8 graph into `work/batched/` (over the main graph's cache: the same `kv_scales`), time it
    against the main graph, and keep it if it wins from some length on: the manifest's `batched` entry, or {}
    (and no folder) if it never does."""
    from gpt2_onnx.engine import Engine

    from .to_onnx import export_fast_graph

    folder = work / BATCHED_FOLDER
    folder.mkdir()
    max_weight_error = export_fast_graph(model, folder, batched_recipe(quant), kv_scales)[1]
    timing = calibrate(Engine(work, manifest=replace(manifest, batched={"folder": BATCHED_FOLDER})))
    if timing["min_tokens"] is None:
        log("      the batched graph was not faster at any length on this machine: left out")
        shutil.rmtree(folder)
        return {}
    log(f"      the batched graph runs passes of {timing['min_tokens']}+ tokens (measured here)")
    return {"folder": BATCHED_FOLDER, "precision": "int8", "kernel": "DynamicQuantizeMatMul",
            "min_tokens": timing["min_tokens"], "max_weight_error": max_weight_error, "calibration": timing}


def calibrate(engine, lengths: tuple[int, ...] = LENGTHS, repeats: int = REPEATS) -> dict:
    """Time prompts of each length through the engine's main and batched graphs; the threshold and why."""
    decoders = [SharedBufferDecoder(session, engine.manifest, engine.provider)
                for session in (engine.session, engine.batched_session)]
    rng = np.random.default_rng(0)
    best = {length: [float("inf"), float("inf")] for length in lengths}
    for decoder in decoders:
        decoder.allocate(1, max(lengths))
        decoder.add([0] * max(lengths))  # warm-up: first runs allocate
        decoder.remove(0)
    for _ in range(repeats):
        for length in lengths:
            prompt = rng.integers(0, engine.manifest.vocab_size, length).tolist()
            for i, decoder in enumerate(decoders):
                start = time.perf_counter()
                decoder.add(prompt)
                best[length][i] = min(best[length][i], time.perf_counter() - start)
                decoder.remove(0)
    return {"min_tokens": threshold(best), "lengths": list(lengths), "repeats": repeats,
            "fastest_ms": {str(length): [round(t * 1e3, 3) for t in pair] for length, pair in best.items()}}


def threshold(best: dict[int, list[float]]) -> int | None:
    """{length: [main s, batched s]} -> the shortest length from which the batched graph is faster at every
    longer length too (None: it is not faster at the longest)."""
    min_tokens = None
    for length in sorted(best, reverse=True):
        main, batched = best[length]
        if batched >= main:
            break
        min_tokens = length
    return min_tokens
