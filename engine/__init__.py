"""The run-time engine: onnxruntime, numpy and tokenizers only (no torch, no transformers, no HTTP)."""

from .config import GenerationConfig, GenerationResult, Timings
from .engine import Engine
from .manifest import Manifest

__all__ = ["Engine", "GenerationConfig", "GenerationResult", "Manifest", "Timings"]
