"""Quantization quality: the exported model against fp32 PyTorch, teacher-forced on a fixed text.

The text is cut into windows of 128 tokens, evenly spaced over it. Each window goes through PyTorch in
batches and through the engine in one prefill that returns every position's logits (the fast graph's
`logits_positions`), and every position's next-token distribution is compared: top-1 agreement, mean
KL(PyTorch || ONNX), and both perplexities with their ratio. The comparison is streamed window by
window into running sums, so memory stays at one batch of PyTorch log-probabilities
(BATCH x WINDOW x vocab floats) whatever the number of windows.

The reference (Optimum) graph returns only the last position's logits, so there each batch of windows
is fed token by token through its KV cache instead, as this module did for every graph before: the two
ways agree to float rounding (tests/test_quality.py checks it). Graphs with a shortlisted LM head are fed
token by token too: a prefill asking for every position takes their full 8-bit head, generation does not.

The default text is prose shipped with the package (`assets/alice.txt`, public domain; see
`assets/README.md`); any text file can replace it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError

WINDOW = 128
WINDOWS = 48  # the default: 48 x 128 = 6,144 tokens (the only place it is declared)
BATCH = 8  # windows per PyTorch forward: 8 x 128 x 50,257 floats = 206 MB of log-probabilities
DEFAULT_TEXT = Path(__file__).parent / "assets" / "alice.txt"
DEFAULT_TEXT_NAME = "Alice's Adventures in Wonderland, chapters I-III (shipped)"


def evaluation_windows(tokenizer, torch_model, text_file: str | Path | None = None, windows: int = WINDOWS,
                       window: int = WINDOW) -> tuple[np.ndarray, str]:
    """[count, window] token ids evenly spaced over the text (default: the shipped prose), and a description.

    `count` is `windows`, or fewer when the text is too short for that many windows without overlap.
    `torch_model` bounds the window by its context.
    """
    path = DEFAULT_TEXT if text_file is None else Path(text_file)
    if window > torch_model.config.n_positions:
        raise Gpt2OnnxError(f"a window of {window} tokens exceeds the model's context of "
                            f"{torch_model.config.n_positions}; use a window of at most that")
    if not path.is_file():
        raise Gpt2OnnxError(f"evaluation text {path} does not exist; pass a text file")
    ids = np.array(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], np.int64)
    count = min(windows, len(ids) // window)
    if count == 0:
        raise Gpt2OnnxError(f"{path} has {len(ids)} tokens, fewer than one window of {window}; give a longer text")
    starts = np.linspace(0, len(ids) - window, count).astype(int)
    name = DEFAULT_TEXT_NAME if text_file is None else path.name
    return np.stack([ids[s:s + window] for s in starts]), f"{name}, {count} windows of {window}"


def measure_quality(torch_model, engine, windows: np.ndarray, batch: int = BATCH,
                    step_by_step: bool | None = None) -> dict:
    """Top-1 agreement, mean KL and perplexities of `engine` against `torch_model` over `windows` [N, L].

    `step_by_step` (default: only for the reference graph) feeds each batch of windows one token at a
    time through the KV cache instead of one prefill per window.
    """
    import torch
    from tqdm import tqdm

    if step_by_step is None:
        # the reference graph returns the last position only; a shortlisted LM head (lm_head.py) scores a
        # prefill's every position with the full 8-bit head, so there decode steps of BATCH rows (no more
        # than its SHORTLIST_MAX_ROWS) measure the head generation uses
        step_by_step = engine.manifest.graph != "fast" or bool(engine.manifest.quantization.get("head_shortlist"))
    totals = _Totals()
    for start in tqdm(range(0, len(windows), batch), desc="      quality", unit="batch", leave=False):
        chunk = windows[start:start + batch]
        with torch.inference_mode():
            reference = torch.log_softmax(torch_model(torch.from_numpy(chunk)).logits.float(), -1)  # [B, L, V]
            for ref, got, ids in zip(reference, _onnx_logits(engine, chunk, step_by_step), chunk):
                totals.add(ref, torch.log_softmax(torch.from_numpy(got), -1), torch.from_numpy(ids))
        del reference
    return totals.summary(int(windows.size))


@dataclass
class _Totals:
    """Running sums over every compared position (float64, so the order of windows does not matter)."""

    agree: int = 0
    predicted: int = 0  # positions with a next token in the window (L - 1 per window)
    kl: float = 0.0
    kl_positions: int = 0  # every position (L per window)
    nll_torch: float = 0.0
    nll_onnx: float = 0.0

    def add(self, ref, got, ids) -> None:
        """ref, got: log-probabilities [L, V] (torch); ids: the window's tokens [L]."""
        import torch

        targets = ids[1:, None]
        self.agree += int((ref[:-1].argmax(-1) == got[:-1].argmax(-1)).sum())
        self.predicted += len(ids) - 1
        self.kl += float((ref.exp() * (ref - got)).sum(-1).double().sum())
        self.kl_positions += len(ids)
        self.nll_torch -= float(torch.gather(ref[:-1], 1, targets).double().sum())
        self.nll_onnx -= float(torch.gather(got[:-1], 1, targets).double().sum())

    def summary(self, tokens: int) -> dict:
        ppl_torch = float(np.exp(self.nll_torch / self.predicted))
        ppl_onnx = float(np.exp(self.nll_onnx / self.predicted))
        return {
            "tokens": tokens,
            "top1_agreement": self.agree / self.predicted,
            "mean_kl": self.kl / self.kl_positions,
            "perplexity_torch": ppl_torch,
            "perplexity_onnx": ppl_onnx,
            "perplexity_ratio": ppl_onnx / ppl_torch,
        }


def _onnx_logits(engine, chunk: np.ndarray, step_by_step: bool) -> Iterator[np.ndarray]:
    """Teacher-forced logits [L, V] at every position of each window of `chunk` [B, L]."""
    if step_by_step:
        yield from stepwise_logits(engine, chunk)
        return
    decoder = engine.new_decoder()
    decoder.allocate(1, chunk.shape[1])
    for window in chunk:
        logits = decoder.add([int(t) for t in window], all_logits=True)  # [L, V]: one prefill, every position
        decoder.remove(0)
        yield logits


def stepwise_logits(engine, chunk: np.ndarray) -> np.ndarray:
    """[B, L, V]: prefill the first token of every window as one batch, then decode the rest one by one."""
    decoder = engine.new_decoder()
    steps = [decoder.prefill([[int(t)] for t in chunk[:, 0]], chunk.shape[1]).copy()]
    for t in range(1, chunk.shape[1]):
        steps.append(decoder.decode(chunk[:, t]).copy())
    return np.stack(steps, axis=1)
