"""Quantization quality: the exported model against fp32 PyTorch, teacher-forced on a fixed text.

The text is cut into windows of 128 tokens; each window is fed token by token through the engine's own
KV-cache decoder (many windows as one batch), and every position's next-token distribution is compared
with PyTorch's: top-1 agreement, mean KL(PyTorch || ONNX), and both perplexities with their ratio.
Without a text, windows are sampled from the fp32 PyTorch model itself (seed 0), which still measures how
far the quantized distributions move, but says nothing about real-text perplexity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WINDOW = 128
WINDOWS = 160  # 160 x 128 = 20,480 tokens
CHUNK = 16  # windows per batch: bounds memory at 2 x CHUNK x WINDOW x vocab floats


def evaluation_windows(tokenizer, torch_model, text_file: Path | None, windows: int = WINDOWS,
                       window: int = WINDOW) -> tuple[np.ndarray, str]:
    """[windows, window] token ids, evenly spaced over the text (or sampled), and a description."""
    if text_file is not None:
        ids = np.array(tokenizer(Path(text_file).read_text())["input_ids"], np.int64)
        count = min(windows, len(ids) // window)
        assert count > 0, f"{text_file} has fewer than {window} tokens"
        starts = np.linspace(0, len(ids) - window, count).astype(int)
        return np.stack([ids[s:s + window] for s in starts]), f"{Path(text_file).name}, {count} windows of {window}"
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its padding-side advice does not apply to unpadded sampling
    torch.manual_seed(0)
    bos = torch.full((windows, 1), torch_model.config.bos_token_id)
    with torch.inference_mode():
        out = torch_model.generate(bos, attention_mask=torch.ones_like(bos), do_sample=True, max_new_tokens=window,
                                   min_new_tokens=window, pad_token_id=torch_model.config.eos_token_id)
    return out[:, 1:].numpy(), f"sampled from the fp32 PyTorch model (seed 0), {windows} windows of {window}"


def measure_quality(torch_model, engine, windows: np.ndarray) -> dict:
    import torch

    from tqdm import tqdm

    top1, kl, nll_torch, nll_onnx = [], [], [], []
    chunks = np.array_split(windows, max(1, len(windows) // CHUNK))
    for chunk in tqdm(chunks, desc="      quality", unit="chunk", leave=False):
        with torch.inference_mode():
            ref = torch.log_softmax(torch_model(torch.from_numpy(chunk)).logits.float(), -1).numpy()
        got = _log_softmax(_onnx_logits(engine, chunk))  # [B, L, V]
        targets = chunk[:, 1:]
        top1.append((ref[:, :-1].argmax(-1) == got[:, :-1].argmax(-1)).ravel())
        kl.append((np.exp(ref) * (ref - got)).sum(-1).ravel())
        nll_torch.append(-np.take_along_axis(ref[:, :-1], targets[..., None], -1).ravel())
        nll_onnx.append(-np.take_along_axis(got[:, :-1], targets[..., None], -1).ravel())
    ppl_torch, ppl_onnx = float(np.exp(np.concatenate(nll_torch).mean())), float(np.exp(np.concatenate(nll_onnx).mean()))
    return {
        "tokens": int(windows.size),
        "top1_agreement": float(np.concatenate(top1).mean()),
        "mean_kl": float(np.concatenate(kl).mean()),
        "perplexity_torch": ppl_torch,
        "perplexity_onnx": ppl_onnx,
        "perplexity_ratio": ppl_onnx / ppl_torch,
    }


def _onnx_logits(engine, chunk: np.ndarray) -> np.ndarray:
    """Teacher-forced logits at every position: prefill the first token, then decode the rest."""
    decoder = engine.new_decoder()
    steps = [decoder.prefill([[int(t)] for t in chunk[:, 0]], chunk.shape[1]).copy()]
    for t in range(1, chunk.shape[1]):
        steps.append(decoder.decode(chunk[:, t]).copy())
    return np.stack(steps, axis=1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
