"""Output parity against PyTorch fp32: same greedy tokens, max |Δlogit|, and for quantized precisions
top-1 agreement and KL on a fixed text (the measurement the quantization issue uses at export)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .systems import EngineSystem, System


def greedy_agreement(tokens: dict[str, np.ndarray], reference: str = "pytorch") -> dict:
    """Per system: are its greedy tokens (first prompt of the latency run) PyTorch's, and where do they part."""
    if reference not in tokens:
        return {}
    want = tokens[reference]
    out = {}
    for name, got in tokens.items():
        differs = np.flatnonzero(got != want)
        out[name] = {"identical": not differs.size, "first_difference": int(differs[0]) if differs.size else None,
                     "tokens": int(want.size)}
    return out


def engine_parity(systems: list[System], checkpoint: Path, eval_text: Path | None, windows: int,
                  log: Callable[[str], None] = print, random_text: bool = False) -> dict:
    """max |Δlogit| (prefill + 8 decode steps) for every engine export, and quality for the quantized ones,
    on `eval_text`, else on the prose shipped with the package, or (`random_text`, quick runs) on random ids."""
    from gpt2_onnx.export.load import load_checkpoint
    from gpt2_onnx.export.parity import measure_parity
    from gpt2_onnx.export.quality import WINDOW, evaluation_windows, measure_quality

    loaded = load_checkpoint(str(checkpoint))
    engines = [s for s in systems if isinstance(s, EngineSystem)]
    text_windows, described = None, None
    out = {}
    for system in engines:
        log(f"  {system.name}: logits against PyTorch")
        engine = system.engine.batched_from(None)  # the graph generated tokens come from (the manifest has both)
        out[system.name] = {"logits": measure_parity(loaded.model, engine)}
        if system.engine.manifest.precision != "fp32":
            if text_windows is None and eval_text is None and random_text:
                vocab = loaded.model.config.vocab_size
                text_windows = np.random.default_rng(0).integers(0, min(vocab, 50000), (windows, WINDOW))
                described = f"random token ids, {windows} windows of {WINDOW}"
            elif text_windows is None:
                text_windows, described = evaluation_windows(loaded.tokenizer, loaded.model, eval_text, windows)
            log(f"  {system.name}: quality on {described}")
            out[system.name]["quality"] = {"text": described,
                                           **measure_quality(loaded.model, engine, text_windows)}
    return out
