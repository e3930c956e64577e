"""The routes beside completions: vLLM's tokenizer endpoints (as lm-evaluation-harness's RemoteTokenizer reads
them), the manifest, attention maps and the playground page, with their limits and OpenAI-shaped errors."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gpt2_onnx.engine import Engine
from gpt2_onnx.serve.app import ServerConfig, create_app
from gpt2_onnx.serve.routes_extra import MAX_DETOKENIZE_TOKENS, MAX_TOKENIZE_CHARS

TEXT = "Hello world, Übermäßig 🚀<|endoftext|>"


@pytest.fixture(scope="module")
def engine(tiny_export) -> Engine:
    return Engine(tiny_export, threads=1)


@pytest.fixture(scope="module")
def api(engine):
    with TestClient(create_app(engine, ServerConfig())) as client:
        yield client


def test_tokenize_and_detokenize_round_trip_the_engines_tokenizer(api, engine):
    body = api.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()
    assert body["tokens"] == engine.tokenizer.encode(TEXT).ids and body["tokens"][-1] == 50256
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.manifest.n_positions
    assert api.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": TEXT}


def test_tokenizer_info_names_the_eos_token(api):
    info = api.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == 50256
    assert info["model_max_length"] == 128


def test_lm_eval_remote_tokenizer_reads_the_endpoints(api, monkeypatch):
    """The harness's own client, over the app (its requests.Session routed to the test client)."""
    lm_eval_utils = pytest.importorskip("lm_eval.utils")

    class Session:
        headers: dict = {}

        def request(self, method, url, timeout=None, verify=None, **kwargs):
            return api.request(method, url.removeprefix("http://testserver"), **kwargs)

    monkeypatch.setattr(lm_eval_utils.requests, "Session", Session)
    tokenizer = lm_eval_utils.RemoteTokenizer("http://testserver/v1/completions")
    assert tokenizer.eos_token_id == 50256 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


@pytest.mark.parametrize("path, payload, param, status", [
    ("/tokenize", {"prompt": "x" * (MAX_TOKENIZE_CHARS + 1)}, "prompt", 400),
    ("/tokenize", {"prompt": "hi", "model": "gpt-4"}, "model", 404),
    ("/detokenize", {"tokens": [1] * (MAX_DETOKENIZE_TOKENS + 1)}, "tokens", 400),
    ("/detokenize", {"tokens": [50257]}, "tokens", 400),
    ("/detokenize", {"tokens": [-1]}, "tokens", 400),
    ("/detokenize", {"tokens": "abc"}, "tokens", 400),
    ("/attention", {"prompt": "hi", "layer": 2}, "layer", 400),
    ("/attention", {"prompt": "hi", "head": 4}, "head", 400),
    ("/attention", {"prompt": ""}, "prompt", 400),
    ("/attention", {"prompt": "hi " * 200}, "prompt", 400),
], ids=lambda v: str(v)[:30])
def test_bounded_inputs_get_openai_shaped_errors(api, path, payload, param, status):
    response = api.post(path, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}


def test_attention_without_the_graph_says_how_to_get_it(api):
    response = api.post("/attention", json={"prompt": "hi"})
    assert response.status_code == 404 and "--with-attention" in response.json()["error"]["message"]


def test_attention_endpoint_returns_the_engines_head(tiny_checkpoint, tmp_path_factory):
    from gpt2_onnx.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny-att"
    export_model(str(tiny_checkpoint), out, with_attention=True, log=lambda _: None)
    engine = Engine(out, threads=1)
    with TestClient(create_app(engine, ServerConfig())) as client:
        body = client.post("/attention", json={"prompt": "The cat sat on the mat", "layer": 1, "head": 2}).json()
    maps = engine.attention("The cat sat on the mat")
    assert body["tokens"] == maps.tokens and (body["n_layer"], body["n_head"]) == (2, 4)
    np.testing.assert_allclose(body["attention"], maps.probs[1, 2], atol=1e-5)


def test_manifest_and_playground_are_served(api, engine):
    expected = json.loads(json.dumps({"model": engine.model_dir.name, **asdict(engine.manifest)}))
    assert api.get("/manifest").json() == expected
    for path in ("/", "/playground"):
        page = api.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "gpt2-onnx playground" in page.text and "http" not in page.text.split("<script>")[1].split("fetch(")[0]


def test_the_page_is_open_but_the_api_needs_the_key(engine):
    with TestClient(create_app(engine, ServerConfig(api_key="secret"))) as client:
        assert client.get("/").status_code == 200
        for path in ("/manifest", "/tokenizer_info"):
            assert client.get(path).status_code == 401
        assert client.get("/manifest", headers={"Authorization": "Bearer secret"}).status_code == 200
