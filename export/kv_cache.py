"""An int8 KV cache (`--kv-cache int8`): per-channel scales for each layer's keys and values, from text.

GroupQueryAttention can keep its cache as int8 (onnxruntime's quantized-cache mode, CPU and CUDA): it stores
q = round(x / scale), saturating at ±127 (tests/test_kv_cache.py checks the saturation), and dequantizes on
read, with one scale per head channel ([1, heads, 1, head_dim], PER_CHANNEL), so GPT-2's outlier channels
keep their own range. The cache takes a quarter of the fp32 bytes, and a wide decode step reads it whole:
gpt2 at 32 rows and ~100 positions reads ~230 MB of fp32 cache a step beside 110 MB of int8 weights.

The scales are the largest |K| and |V| per channel over calibration text (the shipped prose, CALIBRATION
windows of up to CALIBRATION_WINDOW tokens: positions far into the context too), times MARGIN for text
that reaches a little further. Both graphs of an export (main and batched) read the same cache, so they
are written with the same scales.
"""

from __future__ import annotations

import numpy as np

CALIBRATION = 8  # windows of text
CALIBRATION_WINDOW = 512  # tokens each (or the model's context, if shorter)
MARGIN = 1.25  # headroom over the calibration text's largest value, per channel
QMAX = 127


def calibrate_kv_scales(model, tokenizer, text_file=None) -> dict[str, np.ndarray]:
    """{f"h.{i}.attn.k_scale" / "v_scale": float32 [1, heads, 1, head_dim]} for each layer of `model`
    (a GPT2LMHeadModel), from its cache over calibration windows of `text_file` (default: the shipped prose)."""
    import torch

    from .quality import evaluation_windows

    window = min(CALIBRATION_WINDOW, model.config.n_positions)
    ids, _ = evaluation_windows(tokenizer, model, text_file, CALIBRATION, window)
    largest: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for row in ids:  # one window at a time: the cache of a 512-token window of gpt2-xl is ~300 MB
            cache = model(torch.from_numpy(row[None]), use_cache=True).past_key_values
            for i, (keys, values) in enumerate(_layers(cache)):
                for kind, x in (("k", keys), ("v", values)):  # [1, heads, T, head_dim]
                    amax = x.abs().amax(dim=(0, 2), keepdim=True).float().numpy()
                    name = f"h.{i}.attn.{kind}_scale"
                    largest[name] = np.maximum(largest[name], amax) if name in largest else amax
    # a channel that never moved still needs a usable scale
    return {name: np.maximum(amax * MARGIN / QMAX, 1e-6).astype(np.float32) for name, amax in largest.items()}


def _layers(cache):
    """(keys, values) per layer from a transformers cache object or the legacy tuple of tuples."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]
