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


def session_options(threads: int | None) -> ort.SessionOptions:
    """Chosen for latency at batch 1: all graph optimisations, a fixed intra-op pool, no inter-op pool."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise to users
    return options


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask), else all CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus)


def create_session(model_dir: Path, provider: str, threads: int | None) -> ort.InferenceSession:
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
        return ort.InferenceSession(str(path), session_options(threads), providers=[ep])
    except Exception as exc:  # onnxruntime raises several pybind types; all mean the file is unusable
        raise Gpt2OnnxError(f"could not load {path}: {first_line(exc)}; the file is corrupt or incomplete, "
                            "re-export it") from None


def missing_model_hint(folder: Path) -> str:
    """What to do with a folder that has no model.onnx: never suggest writing over the user's checkpoint."""
    if any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        return (f"{folder} is a Hugging Face checkpoint, not an export; export it first: "
                f"`gpt2-onnx export {folder} {folder.name}-onnx`, then use {folder.name}-onnx")
    return f"{folder / MODEL_FILE} is missing; is {folder} a folder written by `gpt2-onnx export SOURCE OUT_DIR`?"
