"""gpt2-onnx: export GPT-2 checkpoints to ONNX and decode them fast with onnxruntime.

`gpt2_onnx.engine` is the run-time half (onnxruntime, numpy, tokenizers); `gpt2_onnx.export` needs
torch and transformers and is imported only when exporting.
"""

__version__ = "0.1.0"


def pipeline(task: str, model, provider: str = "cpu", threads: int | None = None):
    """transformers-style `pipeline("text-generation", model=MODEL_DIR)`; see gpt2_onnx.text_generation."""
    from gpt2_onnx.text_generation import pipeline as make

    return make(task, model, provider=provider, threads=threads)
