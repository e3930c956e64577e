"""Scale: the export paths of gpt2-medium, -large and -xl, crossed by models small enough for CI.

A 24-layer narrow model goes through gpt2-medium's layer loop at every precision; lowering
`to_onnx.PROTOBUF_LIMIT` sends it down the path of models over 2 GB (weights streamed into
`model.onnx.data`, large tensors aligned for memory mapping, the engine reading them there). The slow
test exports random:gpt2-xl itself and holds its peak memory to 2.5x its weights.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gpt2_onnx.export import QuantConfig, export_model
from gpt2_onnx.export.external_data import ALIGN, ALIGN_FROM, EXTERNAL_DATA_FILE, ExternalDataWriter, save_embedded

from .conftest import make_checkpoint

NARROW = dict(n_layer=24, n_head=2, n_embd=64, n_positions=128, initializer_range=0.2)
PRECISIONS = {"fp32": QuantConfig.fp32(), "int8": QuantConfig.int8(), "int4": QuantConfig.int4()}


@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("narrow") / "narrow-24", **NARROW)


def external_tensors(model_dir) -> list[dict]:
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return [{e.key: e.value for e in t.external_data} | {"name": t.name}
            for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


@pytest.mark.parametrize("name", list(PRECISIONS), ids=list(PRECISIONS))
def test_deep_model_over_the_limit_streams_to_external_data_and_matches_torch(narrow_checkpoint, tmp_path,
                                                                              monkeypatch, name):
    import gpt2_onnx.export.to_onnx as to_onnx

    monkeypatch.setattr(to_onnx, "PROTOBUF_LIMIT", 1_000_000)  # pretend the model is over 2 GB
    out = tmp_path / name
    export_model(str(narrow_checkpoint), out, quant=PRECISIONS[name], eval_windows=2, log=lambda _: None)
    manifest = json.loads((out / "gpt2_onnx.json").read_text())
    assert (out / "model.onnx").stat().st_size < 1_000_000 and (out / EXTERNAL_DATA_FILE).exists()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == NARROW["n_layer"]
    large = [t for t in external_tensors(out) if int(t["length"]) >= ALIGN_FROM]
    assert large and all(int(t["offset"]) % ALIGN == 0 for t in large), large
    if name == "fp32":
        assert manifest["parity"]["greedy_tokens_match"] and manifest["parity"]["max_abs_logit_diff"] <= 1e-4
    else:  # random weights at 4 or 8 bits: greedy choices may differ, the stages must all have run
        assert np.isfinite(manifest["parity"]["max_abs_logit_diff"]) and manifest["quality"]["tokens"] == 2 * 128


def test_models_under_the_limit_are_one_file(tiny_export):
    assert not (tiny_export / EXTERNAL_DATA_FILE).exists()
    assert external_tensors(tiny_export) == []


def test_streamed_initializers_read_back_equal_from_one_file(tmp_path):
    arrays = {"small": np.arange(3, dtype=np.int64), "odd": np.ones(1001, np.float32),
              "large": np.random.default_rng(0).standard_normal((512, 640)).astype(np.float32),
              "packed": np.arange(3 * 1024 * 1024, dtype=np.uint8).reshape(1024, -1)}
    with ExternalDataWriter(tmp_path) as writer:
        tensors = [writer.tensor(array, name) for name, array in arrays.items()]
    save_embedded(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], tensors)), tmp_path,
                  tmp_path / "model.onnx")
    assert not (tmp_path / EXTERNAL_DATA_FILE).exists()
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert sorted(t.name for t in model.graph.initializer) == sorted(arrays)
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), arrays[tensor.name])


@pytest.mark.slow
def test_gpt2_xl_fp32_exports_within_two_and_a_half_times_its_weights(tmp_path):
    out = tmp_path / "gpt2-xl"
    command = [sys.executable, "-m", "gpt2_onnx.cli", "export", "random:gpt2-xl", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]  # e.g. no room for its 6 GB
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child's, in bytes
        weights = (out / EXTERNAL_DATA_FILE).stat().st_size
        manifest = json.loads((out / "gpt2_onnx.json").read_text())
        assert weights > 6e9 and peak <= 2.5 * weights, (peak, weights)
        assert manifest["parity"]["max_abs_logit_diff"] <= 1e-4
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 6 GB
