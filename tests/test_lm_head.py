"""The shortlisted LM head (export/lm_head.py): 4-bit scores for every token, the best re-scored from 8 bits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gpt2_onnx.errors import Gpt2OnnxError
from gpt2_onnx.export import QuantConfig
from gpt2_onnx.export.builder import OPSET, GraphShape, GraphWriter
from gpt2_onnx.export.lm_head import SHORTLIST_MAX_ROWS, WIDE_HEAD_MIN_ROWS, embedding_and_head
from gpt2_onnx.export.quality import BATCH
from gpt2_onnx.export.quantize import MAX_SHORTLIST, dequantize, quantize_blockwise, quantize_per_channel_int8

VOCAB, WIDTH, BLOCK, SHORTLIST = 300, 64, 32, 16
SHAPE = GraphShape(n_layer=1, n_head=1, n_embd=WIDTH, n_positions=8, vocab_size=VOCAB, layer_norm_epsilon=1e-5)


def head_session(wte: np.ndarray, **recipe) -> ort.InferenceSession:
    """hidden [B, N, E] -> logits [B, N, V] through the head alone; accuracy_level 0: fp32 products,
    so every difference below comes from the weights' bits and the shortlist, not activation rounding."""
    g = GraphWriter(QuantConfig("int8", block_size=BLOCK, accuracy_level=0, **recipe))
    _, head = embedding_and_head(g, wte, replace(SHAPE, vocab_size=len(wte)))
    head("hidden")
    g.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(g.nodes, "head", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], g.initializers)
    model = helper.make_model(graph, opset_imports=OPSET)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the embedding's table is an unused initializer here
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def heads():
    rng = np.random.default_rng(0)
    wte = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    return wte, {"shortlisted": head_session(wte, head_shortlist=SHORTLIST),
                 "8-bit": head_session(wte, head_shortlist=0),
                 "4-bit": head_session(wte, head_shortlist=0, lm_head_bits=4),
                 "8-bit, wide": head_session(wte, head_shortlist=0, wide_head=True),
                 "shortlisted, wide": head_session(wte, head_shortlist=SHORTLIST, wide_head=True)}


def dynamic_int8_product(hidden: np.ndarray, wte: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeMatMul computes: hidden quantized to uint8 over the whole tensor (its range widened
    to hold 0), times the per-channel int8 table, in integers, then scaled back."""
    q8, scales, _ = quantize_per_channel_int8(wte.T)
    low, high = min(hidden.min(), 0.0), max(hidden.max(), 0.0)
    scale = (high - low) / 255
    zero = np.clip(np.round(-low / scale), 0, 255)
    quantized = np.clip(np.round(hidden / scale) + zero, 0, 255)
    return ((quantized - zero) @ q8.astype(np.float64)) * scale * scales


@pytest.mark.parametrize("rows, positions", [(1, 1), (4, 2), (SHORTLIST_MAX_ROWS, 1)])
def test_the_shortlist_is_rescored_exactly_from_the_8_bit_table(heads, rows, positions):
    wte, sessions = heads
    hidden = np.random.default_rng(rows).standard_normal((rows, positions, WIDTH)).astype(np.float32)
    logits, approx, full = (sessions[k].run(None, {"hidden": hidden})[0] for k in ("shortlisted", "4-bit", "8-bit"))
    rows8 = dequantize(quantize_blockwise(wte.T, 8, BLOCK, symmetric=True)).T  # [V, E], the 8-bit table
    top = np.argsort(-approx, axis=-1, kind="stable")[..., :SHORTLIST]
    expected = approx.copy()  # outside the shortlist: the 4-bit score, as the 4-bit head computes it
    np.put_along_axis(expected, top, np.einsum("bnke,bne->bnk", rows8[top], hidden), axis=-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)
    # greedy picks the 8-bit head's argmax (random weights: it is among the 4-bit top 16 here)
    assert (logits.argmax(-1) == full.argmax(-1)).all()
    assert not np.allclose(logits, full, atol=1e-3)  # and the tail really is 4-bit


def test_a_vocabulary_smaller_than_the_shortlist_is_rescored_whole():
    wte = np.random.default_rng(2).standard_normal((SHORTLIST // 2, WIDTH)).astype(np.float32)  # V < shortlist
    hidden = np.random.default_rng(3).standard_normal((2, 1, WIDTH)).astype(np.float32)
    logits = head_session(wte, head_shortlist=SHORTLIST).run(None, {"hidden": hidden})[0]
    rows8 = dequantize(quantize_blockwise(wte.T, 8, BLOCK, symmetric=True)).T
    np.testing.assert_allclose(logits, hidden @ rows8.T, rtol=1e-5, atol=1e-4)  # every token exact from 8 bits


def test_wide_passes_take_the_whole_8_bit_head(heads):
    _, sessions = heads
    hidden = np.random.default_rng(1).standard_normal((3, SHORTLIST_MAX_ROWS, WIDTH)).astype(np.float32)
    logits, full = (sessions[k].run(None, {"hidden": hidden})[0] for k in ("shortlisted", "8-bit"))
    np.testing.assert_array_equal(logits, full)


@pytest.mark.parametrize("rows, positions", [(1, 1), (1, WIDE_HEAD_MIN_ROWS - 1), (WIDE_HEAD_MIN_ROWS, 1),
                                             (2, WIDE_HEAD_MIN_ROWS), (3, SHORTLIST_MAX_ROWS)])
def test_passes_of_many_rows_take_the_wide_head(heads, rows, positions):
    wte, sessions = heads
    hidden = np.random.default_rng(rows * positions).standard_normal((rows, positions, WIDTH)).astype(np.float32)
    narrow, wide = (sessions[k].run(None, {"hidden": hidden})[0] for k in ("8-bit", "8-bit, wide"))
    if rows * positions < WIDE_HEAD_MIN_ROWS:
        np.testing.assert_array_equal(wide, narrow)  # a prompt's one row and short batches: the 8-bit blocks
        return
    np.testing.assert_allclose(wide, dynamic_int8_product(hidden, wte), rtol=1e-4, atol=1e-3)
    assert not np.allclose(wide, narrow, atol=1e-3)  # really the other table
    assert np.abs(wide - narrow).max() < 0.05 * np.abs(narrow).max()  # and the same head


def test_a_shortlisted_head_passes_its_wide_passes_to_the_wide_head(heads):
    """With a wide head, the shortlist runs only as far as the 8-bit head did: up to WIDE_HEAD_MIN_ROWS - 1 rows."""
    wte, sessions = heads
    few = np.random.default_rng(5).standard_normal((1, WIDE_HEAD_MIN_ROWS - 1, WIDTH)).astype(np.float32)
    many = np.random.default_rng(6).standard_normal((1, WIDE_HEAD_MIN_ROWS, WIDTH)).astype(np.float32)
    np.testing.assert_array_equal(sessions["shortlisted, wide"].run(None, {"hidden": few})[0],
                                  sessions["shortlisted"].run(None, {"hidden": few})[0])
    np.testing.assert_allclose(sessions["shortlisted, wide"].run(None, {"hidden": many})[0],
                               dynamic_int8_product(many, wte), rtol=1e-4, atol=1e-3)


def test_the_recipe_bounds_the_shortlist():
    assert QuantConfig.int8().shortlist == 32 and QuantConfig.int4().shortlist == 32
    assert QuantConfig.int4(lm_head_bits=4).shortlist == 0 and QuantConfig.fp32().shortlist == 0
    for bad in (-1, MAX_SHORTLIST + 1):
        with pytest.raises(Gpt2OnnxError, match="head_shortlist"):
            QuantConfig("int8", head_shortlist=bad)


def test_quality_steps_through_the_head_generation_uses():
    # measure_quality decodes BATCH windows as rows of one step: all of them must take the shortlist
    assert BATCH <= SHORTLIST_MAX_ROWS


def test_exports_record_the_shortlist_and_the_bytes_a_step_reads(tiny_export, tiny_checkpoint, tmp_path):
    from gpt2_onnx.benchmarks.systems import onnx_weight_bytes
    from gpt2_onnx.engine import Engine
    from gpt2_onnx.engine.manifest import MODEL_FILE, Manifest
    from gpt2_onnx.export import export_model

    assert Manifest.read(tiny_export).quantization["head_shortlist"] == 0  # fp32: a dense head
    exports = {k: export_model(str(tiny_checkpoint), tmp_path / f"int8-{k}", quant=QuantConfig("int8", head_shortlist=k),
                               eval_windows=0, log=lambda _: None).out_dir for k in (0, 32)}
    for k, folder in exports.items():
        assert Manifest.read(folder).quantization["head_shortlist"] == k
        assert Engine(folder).generate("Hello", max_new_tokens=4).token_ids
    # a one-row step streams the 4-bit table instead of the 8-bit one (only gathered from, its scales through a
    # Reshape): half the bytes, the scales of the two tables being the same size
    manifest = Manifest.read(exports[0])
    saved = onnx_weight_bytes(exports[0] / MODEL_FILE) - onnx_weight_bytes(exports[32] / MODEL_FILE)
    assert abs(saved - manifest.vocab_size * manifest.n_embd // 2) < 64  # the If's few constants


@pytest.mark.parametrize("flags, shortlist", [(["--precision", "int8"], 32), (["--precision", "int4"], 32),
                                              (["--precision", "int8", "--head-shortlist", "0"], 0),
                                              (["--precision", "int4", "--head-shortlist", "64"], 64),
                                              (["--precision", "int4", "--lm-head-bits", "4"], 0),
                                              (["--precision", "fp32", "--head-shortlist", "64"], 0)])
def test_the_command_line_sets_the_shortlist(flags, shortlist):
    import argparse

    from gpt2_onnx.cli import add_export, quant_config

    parser = argparse.ArgumentParser()
    add_export(parser.add_subparsers(dest="verb"))
    assert quant_config(parser.parse_args(["export", "gpt2", "out", *flags])).shortlist == shortlist
