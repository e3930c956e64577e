"""The kernel floor's product graph: the export's one-row weight products, cut out with their weights whole."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gpt2_onnx.benchmarks.kernel_floor import narrow_shape, one_row_products
from gpt2_onnx.benchmarks.systems import onnx_weight_bytes

from .conftest import TINY


def run(products: onnx.ModelProto, seed: int = 0) -> tuple[dict, list[np.ndarray]]:
    session = ort.InferenceSession(products.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    return feeds, session.run(None, feeds)


def test_fp32_products_compute_what_the_checkpoint_does(tiny_export, tiny_torch_model):
    products = one_row_products(onnx.load(tiny_export / "model.onnx"))
    width, layers = TINY["n_embd"], TINY["n_layer"]
    assert len(products.graph.node) == 4 * layers + 1  # qkv, attention out, fc, proj in each layer, then the head
    assert sorted(i.name for i in products.graph.input) == [f"x{4 * width}", f"x{width}"]
    feeds, outputs = run(products)
    x = feeds[f"x{width}"]
    wte = tiny_torch_model.transformer.wte.weight.detach().numpy()
    np.testing.assert_allclose(outputs[-1], x @ wte.T, rtol=1e-4, atol=1e-4)  # the tied head, weights intact
    attn = tiny_torch_model.transformer.h[0].attn.c_attn
    first = x @ attn.weight.detach().numpy()  # Conv1D: [in, out]
    bias = attn.bias.detach().numpy()
    assert np.allclose(outputs[0], first, atol=1e-4) or np.allclose(outputs[0], first + bias, atol=1e-4)


@pytest.fixture(scope="module")
def int8_model(tiny_checkpoint, tmp_path_factory) -> onnx.ModelProto:
    from gpt2_onnx.export import QuantConfig, export_model

    out = tmp_path_factory.mktemp("kernel-floor") / "int8"
    export_model(str(tiny_checkpoint), out, quant=QuantConfig.int8(), eval_windows=0, log=lambda _: None)
    return out / "model.onnx"


def test_a_shortlisted_head_times_its_one_row_path(int8_model):
    products = one_row_products(onnx.load(int8_model))
    attributes = [{a.name: a.i for a in node.attribute} for node in products.graph.node]
    heads = [a for a in attributes if a["N"] == 50257]
    assert [h["bits"] for h in heads] == [4]  # the shortlist's 4-bit scoring, not the wide passes' 8-bit head
    assert len(products.graph.node) == 4 * TINY["n_layer"] + 1
    weights = sum(len(t.raw_data) for t in products.graph.initializer)
    # the products read (nearly) all a one-row step streams: all but the LayerNorms' few parameters
    assert 0.95 * onnx_weight_bytes(int8_model) <= weights <= onnx_weight_bytes(int8_model)
    _, outputs = run(products)
    assert all(np.isfinite(o).all() for o in outputs)


def test_a_graph_without_weight_products_is_refused():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(ValueError, match="no weight products"):
        one_row_products(helper.make_model(graph))


@pytest.mark.parametrize("config, width", [({}, 96), ({"n_head": 16, "n_layer": 24}, 128),
                                           ({"n_head": 20, "n_layer": 36}, 160), ({"n_head": 25}, 800)])
def test_the_narrow_twin_keeps_layers_heads_and_vocabulary(config, width):
    shape = narrow_shape(config)
    assert shape["n_embd"] == width and shape["n_embd"] % shape["n_head"] == 0 and shape["n_embd"] % 32 == 0
    assert shape["n_layer"] == config.get("n_layer", 12) and shape["vocab_size"] == 50257
