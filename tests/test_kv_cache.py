"""`--kv-cache int8`: the graphs, the scales, the engine's buffers, quality, and what the cache does past its range."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gpt2_onnx.engine import Engine
from gpt2_onnx.errors import Gpt2OnnxError
from gpt2_onnx.export import QuantConfig, export_model
from gpt2_onnx.export.kv_cache import QMAX, calibrate_kv_scales

from .conftest import EVAL_TEXT, TINY, TRAINED, graph_nodes


@pytest.fixture(scope="module")
def int8_kv_exports(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv8")
    recipes = {"fp32": QuantConfig.fp32(), "fp32-kv8": replace(QuantConfig.fp32(), kv_cache="int8"),
               "int4-kv8": replace(QuantConfig.int4(), kv_cache="int8")}
    return {name: export_model(str(tiny_checkpoint), out / name, quant=quant, eval_windows=0,
                               log=lambda _: None).out_dir for name, quant in recipes.items()}


def cache_scales(model_file) -> dict[str, np.ndarray]:
    model = onnx.load(str(model_file))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_scale")}


def test_both_graphs_keep_an_int8_cache_with_the_same_per_channel_scales(int8_kv_exports):
    folder = int8_kv_exports["int4-kv8"]
    main, batched = folder / "model.onnx", folder / "batched" / "model.onnx"
    assert batched.exists()
    for path in (main, batched):
        attention = [n for n in graph_nodes(path) if n.op_type == "GroupQueryAttention"]
        assert len(attention) == TINY["n_layer"]
        for node in attention:
            attrs = {a.name: a for a in node.attribute}
            assert attrs["k_quant_type"].s == b"PER_CHANNEL" and attrs["kv_cache_bit_width"].i == 8
        caches = [i for i in onnx.load(str(path), load_external_data=False).graph.input if i.name.startswith("past")]
        assert {i.type.tensor_type.elem_type for i in caches} == {TensorProto.INT8}
    scales = cache_scales(main)
    assert len(scales) == 2 * TINY["n_layer"]
    head_dim = TINY["n_embd"] // TINY["n_head"]
    assert all(s.shape == (1, TINY["n_head"], 1, head_dim) and (s > 0).all() for s in scales.values())
    assert all(np.array_equal(scales[k], v) for k, v in cache_scales(batched).items())  # one cache, one scale


def test_the_engine_allocates_a_quarter_of_the_bytes_and_decodes_like_fp32(int8_kv_exports):
    exact, quantized = Engine(int8_kv_exports["fp32"]), Engine(int8_kv_exports["fp32-kv8"])
    assert quantized.manifest.io.kv_dtype == "int8"
    sizes = [engine.batched_from(None).new_decoder().buffer_bytes(4, 64) for engine in (exact, quantized)]
    assert sizes[0] == 4 * sizes[1]
    prompts = ["Hello there", "The thing about love is that it", "1, 2, 3,"]
    for prompt in prompts:  # the tiny fixture's peaked logits keep greedy choices far apart
        assert exact.generate(prompt, max_new_tokens=12).token_ids == quantized.generate(prompt, max_new_tokens=12).token_ids
    together = quantized.generate(prompts, max_new_tokens=8)  # rows of one buffer keep to their own rows
    assert [r.token_ids for r in together] == [quantized.generate(p, max_new_tokens=8).token_ids for p in prompts]


@pytest.mark.parametrize("name, batched_from", [("fp32-kv8", None), ("int4-kv8", None), ("int4-kv8", 1)])
def test_prompts_padded_into_one_pass_match_prompts_alone(int8_kv_exports, name, batched_from):
    """The int8 cache's kernel reads each row's own new tokens (`query_seqlens`): the padding of a shorter prompt
    neither leaks into its row nor shifts it, in the prefill or the decode step after it."""
    engine = Engine(int8_kv_exports[name]).batched_from(batched_from)  # every pass on one graph
    prompts = [list(range(300, 305)), list(range(400, 416)), list(range(500, 511))]
    logits, steps = [], []
    for together in (True, False):
        decoder = engine.new_decoder()
        decoder.allocate(len(prompts), 24)
        logits.append(decoder.add_many(prompts) if together else np.concatenate([decoder.add(p) for p in prompts]))
        steps.append(decoder.decode(np.array([7, 8, 9])).copy())
    if name.startswith("fp32"):
        np.testing.assert_allclose(logits[0], logits[1], atol=1e-4)
        np.testing.assert_allclose(steps[0], steps[1], atol=1e-4)
    else:  # 9 logits rows take the full 8-bit head, one the shortlist (lm_head.py): the choices agree
        assert (logits[0].argmax(1) == logits[1].argmax(1)).all() and (steps[0].argmax(1) == steps[1].argmax(1)).all()


def test_scales_cover_other_text(tiny_torch_model):
    import torch

    from gpt2_onnx.export.load import gpt2_tokenizer

    scales = calibrate_kv_scales(tiny_torch_model, gpt2_tokenizer())
    ids = torch.tensor([gpt2_tokenizer()("It was the best of times, it was the worst of times")["input_ids"]])
    with torch.no_grad():
        cache = tiny_torch_model(ids, use_cache=True).past_key_values
    keys = cache.layers[0].keys if hasattr(cache, "layers") else cache[0][0]
    assert scales["h.0.attn.k_scale"].shape == (1, TINY["n_head"], 1, TINY["n_embd"] // TINY["n_head"])
    # a sentence of other prose stays inside the int8 range the scales give, with the margin mostly to spare
    assert (keys.abs().numpy() / scales["h.0.attn.k_scale"]).max() <= QMAX


def test_values_past_the_range_saturate_instead_of_wrapping():
    """What the scales' margin relies on: onnxruntime clamps a key beyond 127 x scale to 127."""
    heads, head_dim, capacity = 1, 8, 4
    width = heads * head_dim
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1, heads, 1, head_dim], np.full(width, 0.01, np.float32))
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total"] + [""] * 5
                            + ["scale", "scale"], ["out", "k", "v"], domain="com.microsoft", num_heads=heads,
                            kv_num_heads=heads, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL",
                            kv_cache_bit_width=8)
    cache = [helper.make_tensor_value_info(n, TensorProto.INT8, [1, heads, capacity, head_dim]) for n in ("past_k", "past_v")]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, 3 * width]), *cache,
                      helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                      helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info(n, t, None) for n, t in (("out", TensorProto.FLOAT), ("k", TensorProto.INT8),
                                                                 ("v", TensorProto.INT8))], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    qkv = np.concatenate([np.zeros(width), np.full(width, 5.0), np.full(width, -5.0)]).astype(np.float32)  # 500 x scale
    empty = np.zeros((1, heads, capacity, head_dim), np.int8)
    out, keys, values = session.run(None, {"qkv": qkv[None, None], "past_k": empty, "past_v": empty,
                                            "seqlens_k": np.array([0], np.int32), "total": np.array(1, np.int32)})
    assert (keys[0, :, 0] == 127).all() and (values[0, :, 0] == -127).all() | (values[0, :, 0] == -128).all()


def test_int8_cache_is_refused_where_it_cannot_work(tiny_checkpoint, tmp_path):
    with pytest.raises(Gpt2OnnxError, match="fp16 KV cache"):
        QuantConfig("fp16", kv_cache="int8")
    with pytest.raises(Gpt2OnnxError, match="choose one of float32, int8"):
        QuantConfig("int8", kv_cache="int4")
    with pytest.raises(Gpt2OnnxError, match="needs --graph fast"):
        export_model(str(tiny_checkpoint), tmp_path / "ref", quant=replace(QuantConfig.fp32(), kv_cache="int8"),
                     graph="reference", log=lambda _: None)
    assert not (tmp_path / "ref").exists()
    done = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "export", str(tiny_checkpoint), str(tmp_path / "x"),
                           "--precision", "fp16", "--kv-cache", "int8"], capture_output=True, text=True)
    assert done.returncode == 2 and "fp16 KV cache" in done.stderr


@pytest.mark.skipif(not TRAINED.exists(), reason="needs ../shared/models/gpt2-tiny-trained")
def test_quality_on_the_trained_fixture(tmp_path):
    """Against PyTorch fp32 on prose the model never saw: an int8 cache costs int8 weights next to nothing."""
    quality = {}
    for name, quant in {"int8": QuantConfig.int8(), "int8-kv8": replace(QuantConfig.int8(), kv_cache="int8")}.items():
        result = export_model(str(TRAINED), tmp_path / name, quant=quant, eval_text=EVAL_TEXT, eval_windows=48,
                              log=lambda _: None)
        quality[name] = result.manifest.quality
    assert quality["int8-kv8"]["top1_agreement"] >= min(0.99, quality["int8"]["top1_agreement"] - 0.005), quality
    assert quality["int8-kv8"]["perplexity_ratio"] <= quality["int8"]["perplexity_ratio"] + 0.005, quality
