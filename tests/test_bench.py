"""The benchmark suite end to end on a tiny config in --quick mode (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpt2_onnx.benchmarks.report import evaluate

SYSTEMS = "engine-fp32,engine-int8,pytorch,optimum-fp32,llamacpp-q8_0"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "bench", "--model", "random:tiny", "--quick",
                           "--out", str(out / "results"), "--cache", str(out / "cache"), "--systems", SYSTEMS,
                           "--llama-cpp", str(out / "no-llama-cpp"),  # a folder without llama.cpp: skipped, with why
                           "--check", "per_token:engine-fp32/per_token:pytorch<=1000",
                           "--check", "throughput@4:engine-int8>=1e9"],
                          capture_output=True, text=True, timeout=900)
    return done, out / "results"


def test_quick_suite_writes_json_markdown_and_plots(bench_run):
    done, out = bench_run
    assert done.returncode == 1, done.stderr  # the impossible second check fails, and says so
    assert "check failed: throughput@4:engine-int8" in done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["threads"] == 2 and results["machine"]["memory_read_gb_per_s"] > 0
    ran = ["engine-fp32", "engine-int8", "pytorch", "optimum-fp32"]
    assert list(results["latency"]) == ran
    for name in ran:
        first = results["latency"][name][0]
        assert first["point"] == {"batch": 1, "prompt": 32, "new_tokens": 32}
        assert 0 < first["prefill_ms"]["min"] <= first["prefill_ms"]["median"] <= first["prefill_ms"]["max"]
        assert first["per_token_ms"]["p50"] <= first["per_token_ms"]["p90"]
        assert results["throughput"][name][0]["decode_tokens_per_s"]["median"] > 0
    for name in ("engine-fp32", "engine-int8"):  # --quick probes the engine only; full runs probe every system
        probe = results["memory"][name]
        assert probe["cold_start_s"] > 0 and probe["peak_rss_mb"] >= probe["rss_after_load_mb"] > 0
        assert probe["kv_buffer_mb"] > 0 and "rss_growth_long_vs_10_mb" in probe
    assert results["serving"]["levels"][0]["tokens_per_s"] > 0
    direct = results["serving"]["direct"]  # the engine alone on the work of the most clients
    assert direct["point"] == {"batch": 4, "prompt": 32, "new_tokens": 16} and direct["end_to_end_tokens_per_s"]["median"] > 0
    for name in ("engine-fp32", "engine-int8"):
        floor = results["kernel_floor"][name]
        for key in ("step", "products", "overhead", "kernel_floor"):
            for kind in (key, f"prompt_{key}" if key != "step" else "prompt"):
                assert 0 <= floor[f"{kind}_ms"]["min"] <= floor[f"{kind}_ms"]["median"] <= floor[f"{kind}_ms"]["max"]
        assert min(floor[f"{kind}_ms"]["min"] for kind in ("products", "step", "prompt_products", "prompt")) > 0
    assert [c["holds"] for c in results["checks"]] == [True, False]
    markdown = (out / "results.md").read_text()
    for heading in ("## Latency", "## Throughput", "## Floors", "## Serving", "## Size and memory", "## Parity",
                    "## Ratios"):
        assert heading in markdown
    for plot in ("latency_vs_context.png", "throughput_vs_batch.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_is_computed_and_missing_peers_are_skipped_with_a_reason(bench_run):
    results = json.loads((bench_run[1] / "results.json").read_text())
    greedy = results["parity"]["greedy_vs_pytorch"]
    assert greedy["engine-fp32"]["identical"] and greedy["optimum-fp32"]["identical"]
    engines = results["parity"]["engine"]
    assert engines["engine-fp32"]["logits"]["max_abs_logit_diff"] < 1e-4
    quality = engines["engine-int8"]["quality"]
    assert 0.9 <= quality["top1_agreement"] <= 1 and quality["mean_kl"] >= 0
    assert "llama" in results["skipped"]["llamacpp-q8_0"]


def test_checks_read_ratios_of_named_metrics():
    results = {"latency": {"a": [{"point": {"prompt": 32, "batch": 1}, "per_token_ms": {"p50": 2.0},
                                  "prefill_ms": {"median": 9.0}}],
                           "b": [{"point": {"prompt": 32, "batch": 1}, "per_token_ms": {"p50": 10.0},
                                  "prefill_ms": {"median": 30.0}}]}}
    assert evaluate(results, "per_token:a/per_token:b<=0.25") == \
           {"check": "per_token:a/per_token:b", "op": "<=", "bound": 0.25, "value": 0.2, "holds": True}
    assert evaluate(results, "prefill:a>=10")["holds"] is False
    assert evaluate(results, "per_token@512:a<=1")["holds"] is None  # not measured
    with pytest.raises(ValueError, match="cannot read"):
        evaluate(results, "per_token:a < 3")


def test_floor_and_serving_terms():
    results = {"latency": {"a": [{"point": {"prompt": 32, "batch": 1}, "per_token_ms": {"p50": 5.0},
                                  "prefill_ms": {"median": 9.0}}]},
               "systems": {"a": {"weight_mb_per_token": 128.0}}, "machine": {"memory_read_gb_per_s": 32.0},
               "throughput": {"a": [{"point": {"batch": 16}, "decode_tokens_per_s": {"median": 1000.0}}]},
               "serving": {"system": "a", "levels": [{"clients": 32, "tokens_per_s": 800.0}]}}
    assert evaluate(results, "per_token:a/floor:a<=1.25")["value"] == 5.0 / 4.0  # 128 MB at 32 GB/s: 4 ms
    assert evaluate(results, "serving@32:a/throughput@16:a>=0.9") == \
           {"check": "serving@32:a/throughput@16:a", "op": ">=", "bound": 0.9, "value": 0.8, "holds": False}
    assert evaluate(results, "serving@8:a>=1")["holds"] is None and evaluate(results, "floor:b>=1")["holds"] is None
    results["kernel_floor"] = {"a": {"kernel_floor_ms": {"median": 4.5}, "products_ms": {"median": 4.0}}}
    results["serving"]["direct"] = {"point": {"batch": 32}, "end_to_end_tokens_per_s": {"median": 1000.0}}
    assert evaluate(results, "per_token:a/kernel_floor:a<=1.25")["value"] == 5.0 / 4.5
    assert evaluate(results, "products:a<=4")["holds"] and evaluate(results, "overhead:a<=1")["holds"] is None
    results["kernel_floor"]["a"]["step_ms"] = {"median": 5.4}
    assert evaluate(results, "step:a/kernel_floor:a<=1.25")["value"] == pytest.approx(1.2)
    results["kernel_floor"]["a"] |= {"prompt_ms": {"median": 16.0}, "prompt_kernel_floor_ms": {"median": 14.0}}
    assert evaluate(results, "prompt_kernel_floor:a/prompt:a<=1")["value"] == pytest.approx(14.0 / 16.0)
    assert evaluate(results, "prompt:a>=10")["holds"] and evaluate(results, "prompt_overhead:a<=1")["holds"] is None
    assert evaluate(results, "serving@32:a/direct@32:a>=0.9")["value"] == 0.8
    assert evaluate(results, "direct@8:a>=1")["holds"] is None  # measured at 32 rows only


def test_concurrency_gain_on_a_real_server(tiny_export):
    from gpt2_onnx.benchmarks.serving import concurrency_gain

    (round_,) = concurrency_gain(tiny_export, threads=1, requests=4, new_tokens=3, rounds=1)
    assert round_["sequential_s"] > 0 and round_["concurrent_s"] > 0 and round_["gain"] > 0


def test_the_bench_client_keeps_its_connection_and_reports_errors(tiny_export):
    import asyncio

    from gpt2_onnx.benchmarks.serving import Connection, _server

    async def talk(url):
        connection = await Connection(url).open()
        try:
            answers = [await connection.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
                       for _ in range(3)]  # one connection, three requests
            with pytest.raises(RuntimeError, match="400"):
                await connection.post("/v1/completions", {"prompt": [1], "max_tokens": -1})
            return answers
        finally:
            connection.close()

    with _server(tiny_export, threads=1, max_batch=2) as url:
        answers = asyncio.run(talk(url))
    assert [a["usage"]["completion_tokens"] for a in answers] == [2, 2, 2]


def test_bad_bench_arguments_exit_2():
    done = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "bench", "--systems", "engine-fp32,vllm"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown system(s) vllm" in done.stderr


def test_an_engine_export_made_by_other_exporter_code_is_not_reused(monkeypatch, tmp_path):
    from gpt2_onnx.benchmarks import exports

    artifacts = []
    monkeypatch.setattr(exports.ExportCache, "folder", lambda self, artifact, build: artifacts.append(artifact))
    cache = exports.ExportCache("random:tiny", root=tmp_path)
    cache.engine("int8")
    cache.engine("int8")
    monkeypatch.setattr(exports, "_export_code_stamp", lambda: "a changed graph builder")
    cache.engine("int8")
    assert artifacts[0] == artifacts[1] != artifacts[2]
