"""Export GPT-2-family checkpoints to ONNX (needs the `export` extra: torch, transformers, optimum)."""

from .convert import ExportResult, export_model
from .load import PRESETS
from .quantize import QuantConfig

__all__ = ["ExportResult", "PRESETS", "QuantConfig", "export_model"]
