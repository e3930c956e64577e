"""Open an exported model folder: its config, tokenizer and one onnxruntime session.

Reads folders written by `gpt2-onnx export` (with `gpt2_onnx.json`) and plain
`optimum-cli export onnx --task text-generation-with-past` folders of GPT-2 models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

from gpt2_onnx.errors import Gpt2OnnxError

MANIFEST = "gpt2_onnx.json"
MODEL_FILE = "model.onnx"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class ModelInfo:
    n_layer: int
    n_head: int
    head_dim: int
    n_positions: int  # the context window: prompt + new tokens must fit
    vocab_size: int
    eos_token_id: int
    graph: str  # "reference" (Optimum's layout: past in, past+new out) or "fast" (shared KV buffer)
    precision: str
    source: str | None  # what it was exported from, when the manifest says


def read_model_info(model_dir: Path) -> ModelInfo:
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise Gpt2OnnxError(f"{config_file} is missing; export the model with `gpt2-onnx export SOURCE {model_dir}`")
    try:
        config = json.loads(config_file.read_text())
        manifest = json.loads((model_dir / MANIFEST).read_text()) if (model_dir / MANIFEST).exists() else {}
    except json.JSONDecodeError as exc:
        raise Gpt2OnnxError(f"a JSON file in {model_dir} is corrupt ({exc}); re-export the model") from None
    if config.get("model_type") != "gpt2":
        raise Gpt2OnnxError(f"{model_dir} holds a {config.get('model_type')!r} model; only GPT-2 is supported")
    eos = config.get("eos_token_id", 50256)
    return ModelInfo(
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        head_dim=config["n_embd"] // config["n_head"],
        n_positions=config["n_positions"],
        vocab_size=config["vocab_size"],
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        graph=manifest.get("graph", "reference"),
        precision=manifest.get("precision", "fp32"),
        source=manifest.get("source"),
    )


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
        raise Gpt2OnnxError(f"{path} is missing; export the model with `gpt2-onnx export SOURCE {model_dir}`")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=[ep])
    except Exception as exc:  # onnxruntime raises several pybind types; all mean the file is unusable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Gpt2OnnxError(f"could not load {path}: {first}; the file is corrupt or incomplete, re-export it") from None
