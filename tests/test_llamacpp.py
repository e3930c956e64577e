"""llama.cpp as a peer: the GPT-2 GGUF conversion, reading its tools' output, and (slow: needs the llama.cpp
build, minutes the first time, then cached) its greedy tokens and logits against PyTorch's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2_onnx.benchmarks.llamacpp import LlamaCppUnavailable, llama_cpp
from gpt2_onnx.benchmarks.llamacpp_bench import (latency_summary, parse_batched_bench, parse_llama_bench,
                                                 throughput_summary)
from gpt2_onnx.benchmarks.measure import Point

pytest.importorskip("gguf")

# trimmed from llama-bench -p 32 -n 4 -d 0,32 -r 2 -o json and llama-batched-bench --output-format jsonl
LLAMA_BENCH_JSON = json.dumps([
    {"n_prompt": 32, "n_gen": 0, "n_depth": 0, "avg_ns": 3e6, "samples_ns": [2000000, 4000000], "n_threads": 2},
    {"n_prompt": 0, "n_gen": 4, "n_depth": 0, "avg_ns": 4e6, "samples_ns": [4000000, 4000000], "n_threads": 2},
    {"n_prompt": 32, "n_gen": 0, "n_depth": 32, "avg_ns": 5e6, "samples_ns": [5000000, 5000000], "n_threads": 2},
    {"n_prompt": 0, "n_gen": 4, "n_depth": 32, "avg_ns": 1e7, "samples_ns": [8000000, 12000000], "n_threads": 2},
])
BATCHED_BENCH_JSONL = """
main: n_kv_max = 3072, n_batch = 2048
{"n_kv_max": 3072, "pp": 32, "tg": 16, "pl": 1, "n_kv": 48, "t_pp": 0.02, "speed_pp": 1600.0, "t_tg": 0.16, "speed_tg": 100.0, "t": 0.18, "speed": 266.6}
{"n_kv_max": 3072, "pp": 32, "tg": 16, "pl": 4, "n_kv": 192, "t_pp": 0.05, "speed_pp": 2560.0, "t_tg": 0.2, "speed_tg": 320.0, "t": 0.25, "speed": 768.0}
"""


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    from gpt2_onnx.benchmarks.gguf_convert import convert_to_gguf

    return convert_to_gguf(tiny_checkpoint, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def test_gguf_tensors_are_the_checkpoints_in_llama_cpp_layout(tiny_gguf, tiny_torch_model):
    import gguf

    reader = gguf.GGUFReader(tiny_gguf)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = {k: v.numpy() for k, v in tiny_torch_model.state_dict().items()}
    assert len(tensors) == 4 + 12 * 2 and "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    np.testing.assert_array_equal(tensors["token_embd.weight"], state["transformer.wte.weight"])
    np.testing.assert_array_equal(tensors["blk.1.attn_qkv.weight"], state["transformer.h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"], state["transformer.h.0.mlp.c_proj.weight"].T)
    field = reader.fields["gpt2.block_count"]
    assert field.parts[field.data[0]][0] == 2
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 50257 and bytes(tokens.parts[tokens.data[50256]]) == b"<|endoftext|>"


def test_converter_refuses_an_activation_llama_cpp_computes_differently(tiny_checkpoint, tmp_path):
    import shutil

    from gpt2_onnx.benchmarks.gguf_convert import convert_to_gguf
    from gpt2_onnx.errors import Gpt2OnnxError

    shutil.copytree(tiny_checkpoint, tmp_path / "relu")
    config = json.loads((tmp_path / "relu" / "config.json").read_text())
    (tmp_path / "relu" / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(Gpt2OnnxError, match="tanh GELU"):
        convert_to_gguf(tmp_path / "relu", tmp_path / "relu.gguf")


def test_llama_bench_json_reads_as_prefill_and_per_token_at_context():
    summary = latency_summary(parse_llama_bench(LLAMA_BENCH_JSON), Point(1, 32, 4))
    assert summary["prefill_ms"] == {"median": 3.0, "min": 2.0, "max": 4.0}  # the depth-0 prompt test
    assert summary["per_token_ms"]["median"] == 2.5 and summary["per_token_ms"]["min"] == 2.0  # n_gen 4 after 32
    assert summary["decode_tokens_per_s"]["max"] == 500.0 and summary["rounds"] == 2


def test_batched_bench_jsonl_reads_as_decode_tokens_per_second_by_batch():
    rows = parse_batched_bench(BATCHED_BENCH_JSONL)
    assert [r.pl for r in rows] == [1, 4]
    summary = throughput_summary([rows, rows], Point(4, 32, 16))
    assert summary["decode_tokens_per_s"]["median"] == 320.0 and summary["prefill_ms"]["median"] == 50.0
    with pytest.raises(Exception, match="no result for batch 16"):
        throughput_summary([rows], Point(16, 32, 16))


def test_a_folder_without_llama_cpp_tools_is_refused_with_the_fix(tmp_path):
    with pytest.raises(LlamaCppUnavailable, match="no llama-bench in .*--llama-cpp"):
        llama_cpp(tmp_path, root=tmp_path / "cache")


def test_no_compiler_means_unavailable_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda _: None)
    with pytest.raises(LlamaCppUnavailable, match="no cmake on PATH"):
        llama_cpp(root=tmp_path)


@pytest.fixture(scope="module")
def llama():
    try:
        return llama_cpp(log=lambda _: None)
    except LlamaCppUnavailable as why:
        pytest.skip(f"llama.cpp cannot be built here: {why}")


@pytest.fixture(scope="module")
def tiny_llama(llama, tiny_gguf):
    from gpt2_onnx.benchmarks.systems import LlamaCppSystem

    system = LlamaCppSystem("llamacpp-f32", 1, tiny_gguf.parent)
    (tiny_gguf.parent / "model.gguf").symlink_to(tiny_gguf.name)
    system.load()
    yield system
    system.close()


def clear_greedy_prompts(model, rows: int, length: int, new_tokens: int, margin: float) -> np.ndarray:
    """Prompts [rows, length] whose greedy continuation never has a runner-up within `margin` of the top
    logit in PyTorch: on those, a correct f32 llama.cpp must pick the same tokens (on near-ties rounding decides)."""
    import torch

    rng, kept = np.random.default_rng(0), []
    while len(kept) < rows:
        ids = torch.from_numpy(rng.integers(0, 50000, size=(1, length)))
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 min_new_tokens=new_tokens, pad_token_id=50256, output_logits=True,
                                 return_dict_in_generate=True)
        top2 = torch.stack(out.logits).topk(2, dim=-1).values  # [new_tokens, 1, 2]
        if (top2[..., 0] - top2[..., 1]).min() > margin:
            kept.append(ids[0].numpy())
    return np.stack(kept)


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_and_logits_match_torch(tiny_llama, tiny_torch_model):
    import torch

    prompts = clear_greedy_prompts(tiny_torch_model, rows=3, length=12, new_tokens=10, margin=0.05)  # [B, L]
    run = tiny_llama.run(prompts, 10, logits=True)
    ids = torch.from_numpy(prompts)
    with torch.inference_mode():
        want = tiny_torch_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                         min_new_tokens=10, do_sample=False, pad_token_id=50256)[:, 12:].numpy()
        logits = tiny_torch_model(ids[:1]).logits[0, -1].numpy()
    np.testing.assert_array_equal(run.tokens, want)  # all three rows decoded together, each its own sequence
    assert np.abs(tiny_llama.first_logits - logits).max() < 0.02  # llama.cpp's GELU reads an f16 table
    assert len(run.step_times) == 10 and run.step_times == sorted(run.step_times)


@pytest.mark.slow
def test_an_existing_build_folder_is_used_as_is(llama, tmp_path):
    existing = llama_cpp(llama.bin_dir.parent, root=tmp_path)  # the build folder, as --llama-cpp DIR
    assert existing.bin_dir == llama.bin_dir and existing.runner.exists() and existing.version.startswith("dir-")


@pytest.mark.slow
def test_quantized_gguf_loads_and_its_tools_report_in_suite_terms(llama, tiny_checkpoint, tmp_path):
    from gpt2_onnx.benchmarks.exports import ExportCache
    from gpt2_onnx.benchmarks.llamacpp import gguf_model, gguf_weight_bytes
    from gpt2_onnx.benchmarks.llamacpp_bench import tool_results

    cache = ExportCache(str(tiny_checkpoint), tmp_path, log=lambda _: None)
    q8 = gguf_model(cache, llama, "q8_0", threads=1)
    assert gguf_weight_bytes(q8) < gguf_weight_bytes(gguf_model(cache, llama, "f32")) * 8.6 / 32  # 8.5 bits a weight
    results = tool_results(llama, q8, [Point(1, 16, 4)], [Point(1, 16, 4), Point(2, 16, 4)], threads=1, reps=1,
                           log=lambda _: None)
    assert results["latency"][0]["per_token_ms"]["median"] > 0 and results["latency"][0]["prefill_ms"]["median"] > 0
    assert [r["point"]["batch"] for r in results["throughput"]] == [1, 2]
    assert all(r["decode_tokens_per_s"]["median"] > 0 for r in results["throughput"])
