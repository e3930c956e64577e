"""Property-based attack on a real server process: thousands of generated requests (valid, half-valid and
hostile), none may get a 5xx or an answer outside OpenAI's shape, and the server must be healthy after.

GPT2_ONNX_FUZZ_EXAMPLES sets the number of requests per property (default 200; CI runs the default).
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_server import MODEL, running_server

EXAMPLES = int(os.environ.get("GPT2_ONNX_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                    st.text(max_size=5), st.booleans())
small_ints = st.one_of(st.integers(-3, 24), numbers)
token_ids = st.lists(st.integers(-5, 60000), max_size=20)
prompts = st.one_of(st.text(max_size=60), token_ids, st.lists(st.text(max_size=20), max_size=4),
                    st.lists(token_ids, max_size=4), numbers, st.dictionaries(st.text(max_size=3), st.text(max_size=3)))
stops = st.one_of(st.none(), st.text(max_size=8), st.lists(st.text(max_size=8), max_size=20), numbers)
fields = {
    "max_tokens": small_ints, "temperature": numbers, "top_p": numbers, "top_k": small_ints,
    "n": small_ints, "best_of": small_ints, "stop": stops, "seed": numbers, "logprobs": small_ints,
    "echo": st.one_of(st.booleans(), numbers), "stream": st.booleans(), "min_tokens": small_ints,
    "repetition_penalty": numbers, "presence_penalty": numbers, "frequency_penalty": numbers,
    "logit_bias": st.one_of(st.none(), st.dictionaries(st.text(max_size=6), numbers, max_size=4)),
    "stop_token_ids": st.one_of(st.none(), token_ids, numbers), "suffix": st.one_of(st.none(), st.text(max_size=4)),
    "model": st.one_of(st.none(), st.just(MODEL), st.text(max_size=8)), "user": st.text(max_size=8),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()}), numbers),
}
requests = st.fixed_dictionaries({"prompt": prompts}, optional={**fields, "extra": numbers})


@pytest.fixture(scope="module")
def server(long_context_export):
    with running_server(long_context_export, "--max-batch", "8", "--request-timeout", "60") as (url, _):
        yield url


def check_answer(response: httpx.Response, streamed: bool) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"], error
        return
    if streamed:
        lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "[DONE]"
        for line in lines[:-1]:
            body = json.loads(line)
            assert "choices" in body and "error" not in body, body
    else:
        body = response.json()
        assert body["object"] == "text_completion" and body["choices"] and "usage" in body


@FUZZ
@given(payload=requests)
def test_generated_requests_never_get_a_5xx_or_a_foreign_shape(server, payload):
    if isinstance(payload.get("max_tokens"), int) and not isinstance(payload["max_tokens"], bool):
        payload["max_tokens"] = min(payload["max_tokens"], 24)  # bounded work per example, still any sign
    response = httpx.post(f"{server}/v1/completions", content=json.dumps(payload).encode(), timeout=120,
                          headers={"content-type": "application/json"})
    check_answer(response, streamed=payload.get("stream") is True and response.status_code == 200)


well_formed = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
                         st.lists(st.integers(0, 50256), min_size=1, max_size=30))},
    optional={"max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "top_k": st.integers(-1, 50), "n": st.integers(1, 3), "seed": st.integers(0, 2**40),
              "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3), "logprobs": st.integers(0, 5),
              "echo": st.booleans(), "stream": st.booleans(), "repetition_penalty": st.floats(0.5, 2),
              "min_tokens": st.integers(0, 1), "model": st.just(MODEL)})


@FUZZ
@given(payload=well_formed)
def test_well_formed_requests_are_answered(server, payload):
    response = httpx.post(f"{server}/v1/completions", json=payload, timeout=120)
    assert response.status_code == 200, (payload, response.text[:300])
    check_answer(response, streamed=payload.get("stream", False))


@FUZZ
@given(body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_arbitrary_bytes_get_a_4xx_in_openais_shape(server, body, content_type):
    response = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": content_type},
                          timeout=60)
    check_answer(response, streamed=False)


def test_the_server_is_healthy_after_the_fuzzing(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    answer = httpx.post(f"{server}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
