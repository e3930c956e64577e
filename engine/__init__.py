"""The run-time engine: onnxruntime, numpy and tokenizers only (no torch, no transformers)."""

from .config import GenerationConfig, GenerationResult, Timings
from .generate import Engine

__all__ = ["Engine", "GenerationConfig", "GenerationResult", "Timings"]
