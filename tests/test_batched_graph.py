"""The batched graph: an int8 graph beside an int4 export's, sharing its KV cache, for passes of many tokens."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from gpt2_onnx.engine import Engine
from gpt2_onnx.engine.decoders import SharedBufferDecoder
from gpt2_onnx.engine.manifest import MANIFEST, MODEL_FILE, Manifest
from gpt2_onnx.engine.session import session_options
from gpt2_onnx.export import QuantConfig, export_model
from gpt2_onnx.export import batched as batched_module
from gpt2_onnx.export.batched import calibrate, threshold, wants_batched_graph

from .conftest import graph_nodes, nbits, requires_cuda


def fixed_timing(min_tokens):
    def fake(engine, *args, **kwargs):
        assert engine.batched_session is not None  # the export timed a real second session
        return {"min_tokens": min_tokens, "lengths": [4], "repeats": 1, "fastest_ms": {"4": [2.0, 1.0]}}
    return fake


@pytest.fixture(scope="module")
def int4_export(tiny_checkpoint, tmp_path_factory, monkeypatch_module):
    # the decision is timed on the machine that exports; here it is fixed so the test does not depend on load
    monkeypatch_module.setattr(batched_module, "calibrate", fixed_timing(4))
    out = tmp_path_factory.mktemp("batched") / "int4"
    export_model(str(tiny_checkpoint), out, quant=QuantConfig.int4(), eval_windows=4, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_export_writes_checks_and_describes_the_batched_graph(int4_export):
    manifest = Manifest.read(int4_export)
    batched = manifest.batched
    assert batched["folder"] == "batched" and batched["precision"] == "int8" and batched["min_tokens"] == 4
    assert (int4_export / "batched" / MODEL_FILE).is_file()
    assert "batched/model.onnx" in manifest.files and "batched/model.onnx" in manifest.sizes
    # each graph measured on its own: int8 is closer to PyTorch than int4
    assert batched["parity"]["decode_steps"] == manifest.parity["decode_steps"]
    assert batched["parity"]["max_abs_logit_diff"] < manifest.parity["max_abs_logit_diff"]
    assert batched["quality"]["tokens"] == manifest.quality["tokens"] > 0
    assert batched["quality"]["mean_kl"] < manifest.quality["mean_kl"]
    assert not Manifest.read(int4_export).verify(int4_export)


def test_a_manifest_cannot_point_the_batched_graph_outside_the_export(int4_export, tmp_path):
    import shutil

    copy = shutil.copytree(int4_export, tmp_path / "copy")
    data = json.loads((copy / MANIFEST).read_text())
    data["batched"]["folder"] = str(tmp_path / "elsewhere")  # a hand-edited (or hostile) manifest
    (copy / MANIFEST).write_text(json.dumps(data))
    assert Engine(copy).batched_session is not None  # loaded from copy/batched, the only place it can be


def test_a_truncated_batched_graph_is_refused_at_load(int4_export, tmp_path):
    import shutil

    copy = shutil.copytree(int4_export, tmp_path / "copy")
    with open(copy / "batched" / MODEL_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.raises(Exception, match="batched/model.onnx.*truncated"):
        Engine(copy)


def test_passes_run_on_the_graph_their_token_count_chooses(int4_export):
    engine = Engine(int4_export, threads=1)
    main_only, batched_only = engine.batched_from(None).new_decoder(), engine.batched_from(1).new_decoder()
    mixed = engine.new_decoder()  # the manifest's 4
    short, long = [5, 6, 7], [5, 6, 7, 8, 9, 10]
    for decoder in (main_only, batched_only, mixed):
        decoder.allocate(2, 32)
    logits = {name: [d.add(short)[0], d.add(long)[0]] for name, d in
              (("main", main_only), ("batched", batched_only), ("mixed", mixed))}
    assert np.array_equal(logits["mixed"][0], logits["main"][0])  # 3 tokens < 4: the int4 graph
    assert np.array_equal(logits["mixed"][1], logits["batched"][1])  # 6 tokens: the int8 graph
    assert not np.array_equal(logits["main"][1], logits["batched"][1])
    # a decode step of 2 rows (< 4) runs on the int4 graph, over a cache the int8 graph partly wrote
    step = mixed.decode(np.array([11, 12])).copy()
    reference = main_only.decode(np.array([11, 12]))
    assert np.array_equal(step[0], reference[0])  # row 0's cache came from the int4 graph in both
    assert np.corrcoef(step[1], reference[1])[0, 1] > 0.95  # row 1's from int8 here, int4 there: close


def test_two_sessions_share_one_cache_exactly(tiny_export):
    """The same graph as main and batched: every routing gives the very logits one session gives,
    while rows join mid-generation and leave (swap-remove moves caches written by the other session)."""
    manifest = Manifest.read(tiny_export)
    path = str(tiny_export / MODEL_FILE)
    sessions = [ort.InferenceSession(path, session_options(1), providers=["CPUExecutionProvider"]) for _ in range(2)]
    one = SharedBufferDecoder(sessions[0], manifest)
    two = SharedBufferDecoder(sessions[0], manifest, batched=sessions[1], min_tokens=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, manifest.vocab_size, n).tolist() for n in (2, 5, 3, 1)]
    for decoder in (one, two):
        decoder.allocate(4, 40)
    outputs = [[], []]
    for step in range(12):
        if step < len(prompts):
            for out, decoder in zip(outputs, (one, two)):
                out.append(decoder.add(prompts[step])[-1].copy())
        if step == 6:
            for decoder in (one, two):
                decoder.remove(0)
        tokens = np.arange(one.rows) + step
        for out, decoder in zip(outputs, (one, two)):
            out.append(decoder.decode(tokens).copy())
    for a, b in zip(*outputs):
        assert np.array_equal(a, b)


def test_without_a_batched_graph(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(batched_module, "calibrate", fixed_timing(None))  # never faster on this machine: left out
    out = export_model(str(tiny_checkpoint), tmp_path / "never", quant=QuantConfig.int4(), eval_windows=0,
                       log=lambda _: None).out_dir
    assert Manifest.read(out).batched == {} and not (out / "batched").exists()
    assert json.loads((out / MANIFEST).read_text())["batched"] == {}
    off = replace(QuantConfig.int4(), batched_graph=False)
    assert not wants_batched_graph(off) and not wants_batched_graph(QuantConfig.int8(kernel="DynamicQuantizeMatMul"))
    assert wants_batched_graph(QuantConfig.int8(kernel="MatMulNBits"))
    assert Engine(out).new_decoder().batched is None


@pytest.mark.parametrize("best, expected", [
    ({1: [1.0, 2.0], 4: [2.0, 2.5], 16: [5.0, 4.0], 64: [20.0, 10.0]}, 16),
    ({1: [1.0, 0.5], 16: [5.0, 4.0]}, 1),
    ({1: [1.0, 2.0], 16: [5.0, 4.0], 64: [20.0, 21.0]}, None),  # must win at the longest too
    ({1: [1.0, 0.5], 4: [2.0, 3.0], 16: [5.0, 4.0]}, 16),  # a win below a loss does not count
])
def test_threshold(best, expected):
    assert threshold(best) == expected


def test_calibrate_times_both_graphs(int4_export):
    timing = calibrate(Engine(int4_export, threads=1), lengths=(1, 8), repeats=2)
    assert timing["lengths"] == [1, 8] and set(timing["fastest_ms"]) == {"1", "8"}
    assert all(t > 0 for pair in timing["fastest_ms"].values() for t in pair)
    assert timing["min_tokens"] in (None, 1, 8)


def op_counts(model_file) -> dict:
    import collections

    nodes = graph_nodes(model_file)
    return {**collections.Counter(n.op_type for n in nodes), "bits": sorted(nbits(nodes).values())}


def test_the_batched_graph_is_int8_blocks_with_the_same_head_table(int4_export):
    layers = Manifest.read(int4_export).n_layer
    main, wide = op_counts(int4_export / MODEL_FILE), op_counts(int4_export / "batched" / MODEL_FILE)
    # + the LM head's 4-bit shortlist and 8-bit table
    assert main["bits"] == [4] * (4 * layers + 1) + [8] and main.get("DynamicQuantizeMatMul", 0) == 0
    # the same shortlist (a prompt's logits row: 4-bit scores, re-scored from the 8-bit table by
    # GatherBlockQuantized), and per channel for passes of many rows
    assert wide["bits"] == [4] and wide["GatherBlockQuantized"] == 2 and wide["If"] == 1
    assert wide["DynamicQuantizeMatMul"] == 4 * layers + 1


def test_int8_on_matmulnbits_from_the_command_line(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "int8-nbits"
    subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "export", str(tiny_checkpoint), str(out), "--precision",
                    "int8", "--int8-kernel", "MatMulNBits", "--skip-quality"], check=True, capture_output=True)
    manifest = Manifest.read(out)
    assert manifest.quantization["int8_kernel"] == "MatMulNBits"
    assert op_counts(out / MODEL_FILE)["bits"] == [4] + [8] * (4 * manifest.n_layer + 1)  # shortlist, blocks, head
    assert Engine(out).generate("Hello", max_new_tokens=4).token_ids


@requires_cuda
def test_on_cuda_every_pass_runs_on_the_main_graph(int4_export):
    engine = Engine(int4_export, provider="cuda")
    assert engine.batched_session is None and engine.new_decoder().batched is None


def test_two_sessions_on_the_same_cores_stop_spinning_between_runs(int4_export, tiny_export):
    # each session's thread pool spins on after a run; beside another session it would slow that one's next run
    def stops_spinning(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
        except Exception:  # noqa: BLE001 - onnxruntime raises for an entry that was never set
            return False

    engine = Engine(int4_export)
    assert stops_spinning(engine.session) and stops_spinning(engine.batched_session)
    assert not stops_spinning(Engine(tiny_export).session)  # one session alone: spinning between steps pays
    assert stops_spinning(Engine(tiny_export, shares_cores=True).session)  # as the server asks, beside its event loop
