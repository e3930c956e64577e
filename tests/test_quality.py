"""Quality measurement: one prefill per window equals the token-by-token measurement, on the shipped text."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gpt2_onnx.errors import Gpt2OnnxError
from gpt2_onnx.export import QuantConfig, export_model
from gpt2_onnx.export.load import gpt2_tokenizer
from gpt2_onnx.export.quality import (DEFAULT_TEXT, WINDOW, WINDOWS, _onnx_logits, evaluation_windows,
                                      measure_quality, stepwise_logits)

# int4 without its batched graph, int8 on the kernel without one: these tests compare one graph's prefill with
# its own decode steps
PRECISIONS = {"fp32": QuantConfig.fp32(), "int8": QuantConfig.int8(kernel="DynamicQuantizeMatMul"),
              "int4": replace(QuantConfig.int4(), batched_graph=False)}
METRICS = ("top1_agreement", "mean_kl", "perplexity_torch", "perplexity_onnx", "perplexity_ratio")


@pytest.fixture(scope="module")
def tiny_exports(tiny_checkpoint, tmp_path_factory):
    from gpt2_onnx.engine import Engine

    root = tmp_path_factory.mktemp("quality")
    return {name: Engine(export_model(str(tiny_checkpoint), root / name, quant=quant, eval_windows=0,
                                      log=lambda _: None).out_dir, threads=1)
            for name, quant in PRECISIONS.items()}


def test_prefill_quality_matches_step_by_step_in_fp32(tiny_exports, tiny_torch_model):
    windows, _ = evaluation_windows(gpt2_tokenizer(), tiny_torch_model, windows=12)
    engine = tiny_exports["fp32"]
    prefilled = np.stack(list(_onnx_logits(engine, windows, step_by_step=False)))
    assert np.abs(prefilled - stepwise_logits(engine, windows)).max() <= 1e-4
    fast = measure_quality(tiny_torch_model, engine, windows, batch=5)  # 5: a last, partial batch too
    stepwise = measure_quality(tiny_torch_model, engine, windows, step_by_step=True)
    assert fast["tokens"] == stepwise["tokens"] == 12 * WINDOW
    for metric in METRICS:  # perplexities relative (the tiny random model's are ~2e5), the rest absolute
        scale = stepwise[metric] if metric in ("perplexity_torch", "perplexity_onnx") else 1.0
        assert abs(fast[metric] - stepwise[metric]) <= 1e-4 * scale, (metric, fast, stepwise)
    assert fast["top1_agreement"] == 1.0 and fast["mean_kl"] < 1e-6


# Quantized kernels compute a prefill differently from a decode step: int4's MatMulNBits rounds
# differently for many rows than for one (a top-1 flip or two in 1,524 near-ties of the random model);
# int8's DynamicQuantizeMatMul scales activations per tensor, which is a window's 128 tokens in a
# prefill and 12 windows' current tokens in a batched decode step (neither is a batch-1 decode).
@pytest.mark.parametrize("name, max_top1, max_kl, max_ratio", [
    ("int4", 2e-3, 1e-4, 1e-3),
    ("int8", 0.03, 1e-3, 5e-3),
], ids=["int4", "int8"])
def test_quantized_quality_matches_step_by_step(tiny_exports, tiny_torch_model, name, max_top1, max_kl, max_ratio):
    windows, _ = evaluation_windows(gpt2_tokenizer(), tiny_torch_model, windows=12)
    fast = measure_quality(tiny_torch_model, tiny_exports[name], windows)
    stepwise = measure_quality(tiny_torch_model, tiny_exports[name], windows, step_by_step=True)
    assert abs(fast["top1_agreement"] - stepwise["top1_agreement"]) <= max_top1, (fast, stepwise)
    assert abs(fast["mean_kl"] - stepwise["mean_kl"]) <= max_kl, (fast, stepwise)
    assert abs(fast["perplexity_ratio"] - stepwise["perplexity_ratio"]) <= max_ratio, (fast, stepwise)


def test_streamed_sums_equal_the_whole_array_formulas(tiny_exports, tiny_torch_model):
    """The running sums give what the former measurement computed on whole [B, L, V] arrays in numpy."""
    import torch

    windows, _ = evaluation_windows(gpt2_tokenizer(), tiny_torch_model, windows=6)
    engine = tiny_exports["int8"]
    with torch.inference_mode():
        ref = torch.log_softmax(tiny_torch_model(torch.from_numpy(windows)).logits, -1).numpy()
    got = stepwise_logits(engine, windows)
    got = got - got.max(-1, keepdims=True)
    got = got - np.log(np.exp(got).sum(-1, keepdims=True))
    targets = windows[:, 1:, None]
    nll_torch = -np.take_along_axis(ref[:, :-1], targets, -1).mean()
    nll_onnx = -np.take_along_axis(got[:, :-1], targets, -1).mean()
    expected = {"top1_agreement": (ref[:, :-1].argmax(-1) == got[:, :-1].argmax(-1)).mean(),
                "mean_kl": (np.exp(ref) * (ref - got)).sum(-1).mean(),
                "perplexity_ratio": np.exp(nll_onnx) / np.exp(nll_torch)}
    measured = measure_quality(tiny_torch_model, engine, windows, batch=6, step_by_step=True)
    for metric, value in expected.items():
        assert abs(measured[metric] - value) <= 1e-6 * max(1.0, abs(value)), (metric, measured, expected)


def test_default_text_gives_the_default_windows_without_overlap(tiny_torch_model):
    windows, described = evaluation_windows(gpt2_tokenizer(), tiny_torch_model)
    assert windows.shape == (WINDOWS, WINDOW)
    assert "Alice" in described and DEFAULT_TEXT.stat().st_size < 64_000
    ids = np.array(gpt2_tokenizer()(DEFAULT_TEXT.read_text())["input_ids"])
    starts = [int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids, WINDOW) == w).all(1))[0])
              for w in windows]
    assert min(np.diff(starts)) >= WINDOW


def test_a_text_shorter_than_a_window_is_refused(tiny_torch_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to measure anything.")
    with pytest.raises(Gpt2OnnxError, match="fewer than one window"):
        evaluation_windows(gpt2_tokenizer(), tiny_torch_model, short)


def test_a_window_longer_than_the_context_is_refused(tiny_torch_model):
    with pytest.raises(Gpt2OnnxError, match="exceeds the model's context"):
        evaluation_windows(gpt2_tokenizer(), tiny_torch_model, window=tiny_torch_model.config.n_positions + 1)


def test_the_reference_graph_is_measured_step_by_step(tiny_reference_export, tiny_torch_model):
    from gpt2_onnx.engine import Engine

    windows, _ = evaluation_windows(gpt2_tokenizer(), tiny_torch_model, windows=3)
    quality = measure_quality(tiny_torch_model, Engine(tiny_reference_export, threads=1), windows)
    assert quality["top1_agreement"] == 1.0 and quality["mean_kl"] < 1e-6
