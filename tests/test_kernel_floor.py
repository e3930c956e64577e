"""The kernel floor's graphs: the export's weight products cut out with their weights whole, their stand-ins,
and the export with every product replaced by its stand-in (the fixed cost of a pass)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gpt2_onnx.benchmarks.kernel_floor import hollow, is_product, products_graph, random_feeds
from gpt2_onnx.benchmarks.systems import onnx_weight_bytes

from .conftest import TINY


def run(products: onnx.ModelProto, rows: int = 1, seed: int = 0) -> tuple[dict, list[np.ndarray]]:
    session = ort.InferenceSession(products.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_feeds(session, rows, seed)
    return feeds, session.run(None, feeds)


def test_fp32_products_compute_what_the_checkpoint_does(tiny_export, tiny_torch_model):
    products = products_graph(onnx.load(tiny_export / "model.onnx"))
    width, layers = TINY["n_embd"], TINY["n_layer"]
    assert len(products.graph.node) == 4 * layers + 1  # qkv, attention out, fc, proj in each layer, then the head
    assert sorted(i.name for i in products.graph.input) == [f"head{width}", f"x{4 * width}", f"x{width}"]
    feeds, outputs = run(products)
    x = feeds[f"x{width}"]
    wte = tiny_torch_model.transformer.wte.weight.detach().numpy()
    np.testing.assert_allclose(outputs[-1], feeds[f"head{width}"] @ wte.T, rtol=1e-4, atol=1e-4)  # the tied head
    attn = tiny_torch_model.transformer.h[0].attn.c_attn
    first = x @ attn.weight.detach().numpy()  # Conv1D: [in, out]
    bias = attn.bias.detach().numpy()
    assert np.allclose(outputs[0], first, atol=1e-4) or np.allclose(outputs[0], first + bias, atol=1e-4)


def test_a_prompts_products_run_its_rows_but_the_head_one(tiny_export):
    _, outputs = run(products_graph(onnx.load(tiny_export / "model.onnx")), rows=32)
    assert outputs[0].shape[0] == 32 and outputs[-1].shape == (1, 50257)


@pytest.fixture(scope="module")
def int8_export(tiny_checkpoint, tmp_path_factory):
    from gpt2_onnx.export import QuantConfig, export_model

    out = tmp_path_factory.mktemp("kernel-floor") / "int8"
    export_model(str(tiny_checkpoint), out, quant=QuantConfig.int8(), eval_windows=0, log=lambda _: None)
    return out


def test_a_shortlisted_head_times_its_one_row_path(int8_export):
    model = int8_export / "model.onnx"
    products = products_graph(onnx.load(model))
    attributes = [{a.name: a.i for a in node.attribute} for node in products.graph.node]
    heads = [a for a in attributes if a["N"] == 50257]
    assert [h["bits"] for h in heads] == [4]  # the shortlist's 4-bit scoring, not the wide passes' 8-bit head
    assert len(products.graph.node) == 4 * TINY["n_layer"] + 1
    weights = sum(len(t.raw_data) for t in products.graph.initializer)
    # the products read (nearly) all a one-row step streams: all but the LayerNorms' few parameters
    assert 0.95 * onnx_weight_bytes(model) <= weights <= onnx_weight_bytes(model)
    _, outputs = run(products)
    assert all(np.isfinite(o).all() for o in outputs)


def test_stand_ins_write_the_mean_of_the_input_plus_the_bias(int8_export):
    model = onnx.load(int8_export / "model.onnx")
    stand_ins = products_graph(model, stand_ins=True)
    assert {n.op_type for n in stand_ins.graph.node} == {"ReduceMean", "Add"}
    feeds, outputs = run(stand_ins, rows=3)
    first = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    bias = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == first.input[5]))
    x = feeds[f"x{TINY['n_embd']}"]
    np.testing.assert_allclose(outputs[0], x.mean(axis=-1, keepdims=True) + bias, rtol=1e-5, atol=1e-5)
    assert outputs[-1].shape == (1, 50257)


@pytest.mark.parametrize("graph", ["model.onnx", "batched/model.onnx"])
def test_the_hollow_graph_keeps_every_node_but_the_products_and_runs_in_the_decoder(int8_export, graph):
    from gpt2_onnx.engine.decoders import SharedBufferDecoder
    from gpt2_onnx.engine.manifest import Manifest

    model = onnx.load(int8_export / graph)
    empty = hollow(model)
    initializers = {t.name: t for t in empty.graph.initializer}

    def nodes(g) -> list:
        found = []
        for node in g.node:
            found.append(node)
            for attribute in node.attribute:
                found += nodes(attribute.g) if attribute.g.node else []
        return found
    before, after = nodes(model.graph), nodes(empty.graph)
    products = [n for n in before if is_product(n, {t.name: t for t in model.graph.initializer})]
    assert products and not any(is_product(n, initializers) for n in after)
    assert len(after) == len(before) + len(products)  # each product became two nodes; nothing else changed
    assert sorted(n.op_type for n in after if "stand_in" not in n.name) == \
        sorted(n.op_type for n in before if n not in products)
    read_elsewhere = {name for n in before if n not in products for name in n.input}
    only_products = {name for n in products for name in n.input[1:] if name and name not in read_elsewhere}
    assert only_products and not only_products & initializers.keys()  # the weights only products read are gone

    session = ort.InferenceSession(empty.SerializeToString(), providers=["CPUExecutionProvider"])
    decoder = SharedBufferDecoder(session, Manifest.read(int8_export))
    decoder.allocate(1, 40)
    assert decoder.add(list(range(32))).shape == (1, 50257)
    logits = decoder.decode(np.zeros(1, np.int64))
    assert logits.shape == (1, 50257) and np.isfinite(logits).all()


def test_a_graph_without_weight_products_is_refused():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(ValueError, match="no weight products"):
        products_graph(helper.make_model(graph))


def test_fp16_products_stand_ins_and_hollow_graph_keep_fp16(tiny_checkpoint, tmp_path):
    from gpt2_onnx.engine.decoders import SharedBufferDecoder
    from gpt2_onnx.engine.manifest import Manifest
    from gpt2_onnx.export import QuantConfig, export_model

    out = export_model(str(tiny_checkpoint), tmp_path / "fp16", quant=QuantConfig.fp16(), eval_windows=0,
                       log=lambda _: None).out_dir
    model = onnx.load(out / "model.onnx")
    for stand_ins in (False, True):
        _, outputs = run(products_graph(model, stand_ins=stand_ins), rows=2)
        assert all(o.dtype == np.float16 and np.isfinite(o).all() for o in outputs)
    session = ort.InferenceSession(hollow(model).SerializeToString(), providers=["CPUExecutionProvider"])
    decoder = SharedBufferDecoder(session, Manifest.read(out))
    decoder.allocate(1, 40)
    assert np.isfinite(decoder.add(list(range(32)))).all()


@pytest.mark.parametrize("folder", ["missing", "empty", "checkpoint"])
def test_the_command_line_names_a_folder_that_is_not_an_export(folder, tmp_path, tiny_checkpoint, capsys):
    from gpt2_onnx.benchmarks.kernel_floor import main

    path = {"missing": tmp_path / "nothing", "empty": tmp_path, "checkpoint": tiny_checkpoint}[folder]
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "export" in err and "Traceback" not in err


def test_median_ms_runs_before_untimed_ahead_of_every_call():
    import time

    from gpt2_onnx.benchmarks.measure import median_ms

    calls = []
    ms = median_ms(lambda: calls.append("call"), runs=3, warmup=2,
                   before=lambda: (calls.append("before"), time.sleep(0.02)))
    assert calls == ["before", "call"] * 5
    assert ms < 10  # the 20 ms before each call is not in its time


def test_the_cache_size_comes_from_sysfs(tmp_path):
    from gpt2_onnx.benchmarks.kernel_floor import cache_bytes

    assert cache_bytes(tmp_path) == 0  # nothing listed: unknown
    for index, size in enumerate(["32K", "1024K", "32768K"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert cache_bytes(tmp_path) == 32 * 2**20


def test_only_the_fixed_cost_passes_are_timed_cold(tiny_export, monkeypatch):
    """Each hollow and stand-in call follows an eviction; the engine's own step and the products do not (they
    stream their weights themselves)."""
    from gpt2_onnx.benchmarks import kernel_floor

    evictions = []
    monkeypatch.setattr(kernel_floor, "cache_evictor", lambda: lambda: evictions.append(1))
    floors = kernel_floor.kernel_floors({"tiny": tiny_export}, threads=1, rounds=1, runs=2)
    calls = kernel_floor.WARMUP + 2
    assert len(evictions) == len(kernel_floor.PASSES) * len(kernel_floor.COLD_PARTS) * calls
    assert floors["tiny"]["overhead_ms"]["median"] >= 0
