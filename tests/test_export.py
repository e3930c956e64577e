"""Export: manifest, parity, the tied LM head stored once, and the folder written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from gpt2_onnx.engine import Manifest
from gpt2_onnx.errors import Gpt2OnnxError
from gpt2_onnx.export import export_model

from .conftest import TINY, make_checkpoint


def test_manifest_records_parity_io_and_hashes(tiny_export):
    manifest = Manifest.read(tiny_export)
    assert manifest.parity["max_abs_logit_diff"] <= 1e-4
    assert manifest.parity["greedy_tokens_match"]
    assert manifest.parity["decode_steps"] == 8
    assert manifest.precision == "fp32" and manifest.graph == "fast"
    assert manifest.n_layer == TINY["n_layer"]
    pasts, presents = zip(*manifest.io.cache_names(manifest.n_layer))
    inputs, outputs = {*manifest.io.inputs, *pasts}, {manifest.io.logits, *presents}
    assert {"input_ids", "position_ids", "seqlens_k", "past_key_values.1.value"} <= inputs
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    graph = onnx.load(str(tiny_export / "model.onnx")).graph  # the manifest's IO is the graph's
    assert inputs == {i.name for i in graph.input} and outputs == {o.name for o in graph.output}
    assert manifest.io.kv_dtype == "float32"
    assert set(manifest.files) >= {"model.onnx", "tokenizer.json", "config.json"}
    assert manifest.sizes["model.onnx"] == (tiny_export / "model.onnx").stat().st_size
    assert all(manifest.versions[p] for p in ("torch", "transformers", "onnx", "onnxruntime"))


@pytest.mark.parametrize("graph, table", [("fast", "wte.weight"), ("reference", "transformer.wte.weight")])
def test_tied_lm_head_is_stored_once(tiny_export, tiny_reference_export, graph, table):
    folder = tiny_export if graph == "fast" else tiny_reference_export
    model = onnx.load(str(folder / "model.onnx"))
    big = [init.name for init in model.graph.initializer if 50257 in init.dims]
    assert big == [table], big
    weights = sum(np.prod(i.dims) for i in model.graph.initializer) * 4
    assert (folder / "model.onnx").stat().st_size < weights * 1.05


def test_refuses_non_empty_out_dir_without_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Gpt2OnnxError, match="--force"):
        export_model(str(tiny_checkpoint), out, log=lambda _: None)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(Gpt2OnnxError, match="not a gpt2-onnx export"):  # --force replaces only an export
        export_model(str(tiny_checkpoint), out, force=True, log=lambda _: None)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_model(str(tiny_checkpoint), out, log=lambda _: None)  # empty: no --force needed
    (out / "old-marker").write_text("from the previous export")
    export_model(str(tiny_checkpoint), out, force=True, log=lambda _: None)  # a previous export: replaced
    assert not (out / "old-marker").exists() and (out / "model.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_export_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    import gpt2_onnx.export.parity as parity

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure half-way")

    monkeypatch.setattr(parity, "measure_parity", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        export_model(str(tiny_checkpoint), tmp_path / "out", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source, message", [
    ("random:gpt5", "unknown preset"),
    ("./no/such/folder", "no such folder"),
], ids=["unknown-preset", "missing-folder"])
def test_bad_source_names_the_accepted_forms(source, message, tmp_path):
    with pytest.raises(Gpt2OnnxError, match=message):
        export_model(source, tmp_path / "out", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_folder_without_weights_or_wrong_architecture(tiny_checkpoint, tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(Gpt2OnnxError, match="no weights"):
        export_model(str(no_weights), tmp_path / "a", log=lambda _: None)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(Gpt2OnnxError, match="only GPT-2"):
        export_model(str(llama), tmp_path / "b", log=lambda _: None)


def test_random_preset_exports(tmp_path):
    result = export_model("random:tiny", tmp_path / "out", log=lambda _: None)
    assert result.manifest.source_kind == "random"
    assert result.manifest.parity["max_abs_logit_diff"] <= 1e-4


def test_large_models_use_external_data(tmp_path, monkeypatch):
    import gpt2_onnx.export.to_onnx as to_onnx

    monkeypatch.setattr(to_onnx, "PROTOBUF_LIMIT", 1_000_000)  # pretend the tiny model is over 2 GB
    ckpt = make_checkpoint(tmp_path / "ckpt")
    result = export_model(str(ckpt), tmp_path / "out", log=lambda _: None)
    assert (result.out_dir / "model.onnx.data").exists()
    assert (result.out_dir / "model.onnx").stat().st_size < 1_000_000
    assert result.manifest.parity["max_abs_logit_diff"] <= 1e-4
