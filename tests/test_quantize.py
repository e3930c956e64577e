"""Quantization: the quantizer's math, the op counts each precision claims, and quality on a trained model."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from gpt2_onnx.engine import Engine, GenerationConfig
from gpt2_onnx.errors import Gpt2OnnxError
from gpt2_onnx.export import QuantConfig, export_model
from gpt2_onnx.export.quantize import dequantize, quantize_blockwise

from .conftest import EVAL_TEXT, TINY, TRAINED, graph_nodes, nbits, requires_cuda


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True), (8, False)],
                         ids=["int4-sym", "int4-asym", "int8-sym", "int8-asym"])
def test_blockwise_roundtrip_error_is_within_half_a_step(bits, symmetric):
    w = np.random.default_rng(0).standard_normal((96, 40)).astype(np.float32)
    q = quantize_blockwise(w, bits, 32, symmetric)
    assert q.packed.shape == (40, 3, 32 * bits // 8)
    error = np.abs(dequantize(q) - w)
    step = np.repeat(np.abs(q.scales), 32, axis=1).T  # [K, N]
    # asymmetric rounds to the nearest level; symmetric (as llama.cpp's Q4_0) maps the signed extreme to
    # -2^(bits-1), so values near the opposite extreme may clip by up to one step
    assert (error <= (step if symmetric else step / 2) + 1e-6).all()
    assert q.max_abs_error == pytest.approx(error.max(), rel=1e-5)


@pytest.fixture(scope="module")
def quantized_exports(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {name: export_model(str(tiny_checkpoint), root / name, quant=quant, eval_windows=8, log=lambda _: None)
            for name, quant in {"int8": QuantConfig.int8(kernel="DynamicQuantizeMatMul"),
                                "int8-nbits": QuantConfig.int8(kernel="MatMulNBits"), "int4": QuantConfig.int4(),
                                "int4-head4": QuantConfig.int4(lm_head_bits=4)}.items()}


def test_every_projection_is_quantized(quantized_exports):
    layers = TINY["n_layer"]
    for name, export in quantized_exports.items():
        model = export.out_dir / "model.onnx"
        weights = {t.name for t in onnx.load(str(model)).graph.initializer}
        nodes = graph_nodes(model)
        counts = Counter(n.op_type for n in nodes)
        # no float product with a weight is left (the shortlisted head's MatMul multiplies gathered rows)
        assert not [n.name for n in nodes if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights], name
        assert counts["GroupQueryAttention"] == layers
        bits = nbits(nodes)
        if name == "int4-head4":  # a 4-bit head has no shortlist
            assert set(bits.values()) == {4} and counts["If"] == 0 and counts["GatherBlockQuantized"] == 1
            continue
        # the 8-bit head with its 4-bit shortlist, and the embedding and the candidates read from the 8-bit table
        assert bits.pop("/lm_head/full/MatMulNBits") == 8 and bits.pop("/lm_head/shortlist/approx/MatMulNBits") == 4
        assert counts["If"] == 1 and counts["GatherBlockQuantized"] == 2
        if name == "int8":
            assert counts["DynamicQuantizeMatMul"] == 4 * layers and not bits
        else:
            assert list(bits.values()) == [8 if name == "int8-nbits" else 4] * (4 * layers)
            assert counts["DynamicQuantizeMatMul"] == 0


@pytest.mark.parametrize("name", ["int8", "int8-nbits", "int4", "int4-head4"])
def test_quantized_exports_generate_and_carry_their_quality(quantized_exports, name):
    result = quantized_exports[name]
    manifest = json.loads((result.out_dir / "gpt2_onnx.json").read_text())
    assert manifest["precision"] == name.split("-")[0]
    assert {"top1_agreement", "mean_kl", "perplexity_torch", "perplexity_onnx", "perplexity_ratio"} <= set(manifest["quality"])
    assert 0 < manifest["quantization"]["max_weight_error"] < 0.5
    out = Engine(result.out_dir).generate("Hello there", GenerationConfig(max_new_tokens=8, min_new_tokens=8))
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("quant, message", [
    (lambda: QuantConfig("int3"), "unknown precision"),
    (lambda: QuantConfig.int4(block_size=48), "block_size 48 is not supported"),
], ids=["unknown-precision", "odd-block"])
def test_bad_quant_config_is_refused(quant, message):
    with pytest.raises(Gpt2OnnxError, match=message):
        quant()


@pytest.mark.parametrize("flags, kernel", [({"avx2", "avx512f", "avx512_vnni"}, "MatMulNBits"),
                                           ({"avx2", "avx_vnni"}, "MatMulNBits"),
                                           ({"avx2", "fma"}, "DynamicQuantizeMatMul"), (set(), "DynamicQuantizeMatMul")])
def test_the_default_int8_kernel_follows_the_cpu_class(monkeypatch, flags, kernel):
    monkeypatch.setattr("gpt2_onnx.export.quantize.cpu_flags", lambda: flags)
    assert QuantConfig.int8().int8_kernel == kernel
    assert QuantConfig.int8(kernel="DynamicQuantizeMatMul").int8_kernel == "DynamicQuantizeMatMul"
    assert QuantConfig.int4().int8_kernel == "DynamicQuantizeMatMul"  # int4 blocks do not use it


def test_block_that_does_not_divide_the_width_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(Gpt2OnnxError, match="does not divide the hidden size 64"):
        export_model(str(tiny_checkpoint), tmp_path / "out", quant=QuantConfig.int4(block_size=128), log=print)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("width, int4, int8", [(64, 64, 64), (768, 256, 128), (1024, 256, 128), (1280, 256, 128),
                                               (1600, 64, 64), (48, 16, 16)])
def test_the_default_block_is_the_largest_that_divides_the_width(width, int4, int8):
    # int4 gains from blocks of 256 (less per-block work); int8 keeps 128 (quality, for a 1-4 % gain at 256)
    assert QuantConfig.int4().for_width(width).block_size == int4
    assert QuantConfig.int8().for_width(width).block_size == int8
    assert QuantConfig.int4(block_size=64).for_width(width * 4).block_size == 64  # asked for: kept


def test_the_command_line_offers_every_block_size():
    import argparse

    from gpt2_onnx.cli import add_export, quant_config
    from gpt2_onnx.export.quantize import BLOCK_SIZES

    parser = argparse.ArgumentParser()
    add_export(parser.add_subparsers(dest="verb"))
    for size in BLOCK_SIZES:
        args = parser.parse_args(["export", "gpt2", "out", "--precision", "int4", "--block-size", str(size)])
        assert quant_config(args).block_size == size


@pytest.mark.skipif(not TRAINED.exists(), reason="needs ../shared/models/gpt2-tiny-trained")
@pytest.mark.parametrize("name, quant, min_top1, max_ratio", [
    ("int8", QuantConfig.int8(), 0.99, 1.01),
    ("int4", QuantConfig.int4(), 0.97, 1.03),
], ids=["int8", "int4"])
def test_quality_on_the_trained_fixture(tmp_path, name, quant, min_top1, max_ratio):
    result = export_model(str(TRAINED), tmp_path / name, quant=quant, eval_text=EVAL_TEXT, eval_windows=48,
                          log=lambda _: None)
    quality = result.manifest.quality
    assert quality["tokens"] == 48 * 128
    assert quality["top1_agreement"] >= min_top1, quality
    assert quality["perplexity_ratio"] <= max_ratio, quality


@pytest.fixture(scope="module")
def fp16_export(tiny_checkpoint, tmp_path_factory):
    return export_model(str(tiny_checkpoint), tmp_path_factory.mktemp("fp16") / "fp16", quant=QuantConfig.fp16(),
                        eval_windows=8, log=lambda _: None)


def test_fp16_keeps_the_residual_stream_layernorms_and_logits_in_fp32(fp16_export):
    graph = onnx.load(str(fp16_export.out_dir / "model.onnx")).graph
    weights = {t.name: t.data_type for t in graph.initializer}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 4 * TINY["n_layer"] and all(weights[n.input[1]] == f16 for n in matmuls)
    assert weights["wte.weight"] == f16
    for node in graph.node:
        if node.op_type == "SkipLayerNormalization":  # LayerNorm and the residual add read fp32 gamma/beta/bias
            assert all(weights[name] == f32 for name in node.input[2:] if name in weights)
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["logits"] == f32 and types["past_key_values.0.key"] == f16 and types["present.1.value"] == f16
    assert fp16_export.manifest.precision == "fp16"


def test_fp16_matches_pytorch(fp16_export, tiny_engine):
    parity = fp16_export.manifest.parity
    assert parity["greedy_tokens_match"] and parity["max_abs_logit_diff"] < 1e-2
    assert fp16_export.manifest.quality["top1_agreement"] >= 0.99
    engine = Engine(fp16_export.out_dir)
    config = GenerationConfig(max_new_tokens=16)
    prompts = ["Hello there", "The quick brown fox"]
    assert [r.token_ids for r in engine.generate(prompts, config)] == \
           [r.token_ids for r in tiny_engine.generate(prompts, config)]


@requires_cuda
def test_fp16_on_cuda_matches_fp32_on_cpu(fp16_export, tiny_engine):
    engine = Engine(fp16_export.out_dir, provider="cuda")
    config = GenerationConfig(max_new_tokens=16)
    assert engine.generate("Hello there", config).token_ids == tiny_engine.generate("Hello there", config).token_ids
