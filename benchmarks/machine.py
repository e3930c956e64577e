"""What the numbers were measured on: CPU, cores, memory, package versions, and memory bandwidth."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from gpt2_onnx.export.quantize import cpu_flags

from .exports import versions

INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
                     "avx512_bf16")


def machine_facts(threads: int) -> dict:
    import psutil

    return {
        "cpu": _cpu_model(),
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in cpu_flags()],
        "logical_cpus": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {**versions(), "numpy": np.__version__},
        "memory_read_gb_per_s": memory_read_bandwidth(threads),
    }


def memory_read_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of weights onnxruntime's threads can stream: a [1, K] x [K, N] MatMul (what a decode step is
    made of) over a matrix far larger than the caches, its weights on huge pages where the engine's are."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gpt2_onnx.engine.hugepages import collapse_populated_memory, huge_pages_wanted

    k = 4096
    weights = np.ones((k, megabytes * 2**20 // 4 // k), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "read",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weights.shape[1]])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if huge_pages_wanted(None):  # as the engines it is the floor for
        collapse_populated_memory()
    x = np.ones((1, k), np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - start)
    return round(weights.nbytes / best / 1e9, 1)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
