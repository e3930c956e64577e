"""Open an exported model folder: its config, tokenizer and one onnxruntime session.

Reads folders written by `gpt2-onnx export` (with `gpt2_onnx.json`) and plain
`optimum-cli export onnx --task text-generation-with-past` folders of GPT-2 models.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

from gpt2_onnx.errors import Gpt2OnnxError, first_line

from .manifest import MODEL_FILE

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}  # declared once: CLI and API read it


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise Gpt2OnnxError(f"{path} is missing; re-export the model (export writes the tokenizer beside it)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise Gpt2OnnxError(f"{path} is corrupt ({exc}); re-export the model") from None


def session_options(threads: int | None, shares_cores: bool = False) -> ort.SessionOptions:
    """Chosen for latency at batch 1: all graph optimisations, a fixed intra-op pool, no inter-op pool.

    `shares_cores`: other work of this process needs the same cores between runs: a second session (the
    batched graph beside the main one) or a server's event loop. A session's pool workers keep spinning for a
    while after a run; through the other session's next run that slowed it ~2x (int4 gpt2, 2 threads: a
    32-token prompt right after a decode step 29.6-31.0 ms instead of 14.9-15.7; the 8 decode steps after a
    prompt 7.6-8.1 ms instead of 4.0-4.3), and a server at 32 clients (int8) delivered 685-704 tokens/s
    instead of 800. So such sessions stop spinning when a run ends; within a run they still spin. Alone, one
    session is better off spinning between its decode steps (int8 batch 1: 4.8-5.1 ms a step against 4.9-6.1).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise to users
    if shares_cores:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask), else all CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus)


def create_session(model_dir: Path, provider: str, threads: int | None,
                   shares_cores: bool = False) -> ort.InferenceSession:
    if provider not in PROVIDERS:
        raise Gpt2OnnxError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    ep = PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        raise Gpt2OnnxError(f"provider {provider!r} needs onnxruntime-gpu and a CUDA device; this onnxruntime "
                            f"offers {', '.join(ort.get_available_providers())} "
                            "(pip uninstall onnxruntime && pip install onnxruntime-gpu)")
    path = model_dir / MODEL_FILE
    if not path.exists():
        raise Gpt2OnnxError(missing_model_hint(model_dir))
    try:
        return ort.InferenceSession(str(path), session_options(threads, shares_cores), providers=[ep])
    except Exception as exc:  # onnxruntime raises several pybind types; all mean the file is unusable
        raise Gpt2OnnxError(f"could not load {path}: {first_line(exc)}; the file is corrupt or incomplete, "
                            "re-export it") from None


def missing_model_hint(folder: Path) -> str:
    """What to do with a folder that has no model.onnx: never suggest writing over the user's checkpoint."""
    if any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        return (f"{folder} is a Hugging Face checkpoint, not an export; export it first: "
                f"`gpt2-onnx export {folder} {folder.name}-onnx`, then use {folder.name}-onnx")
    return f"{folder / MODEL_FILE} is missing; is {folder} a folder written by `gpt2-onnx export SOURCE OUT_DIR`?"
