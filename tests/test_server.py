"""The HTTP server as clients see it: a real process on 127.0.0.1, the official `openai` client and raw HTTP."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI

from gpt2_onnx.engine import Engine, GenerationConfig

MODEL = "tiny-1024"  # the served model: the export folder's name
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():\n    ", "Übermäßig schöne Grüße", "Hello",
           "In 1905, Einstein", "Rockets 🚀 and pizza 🍕", "A B C D E F G"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir, *args: str):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gpt2_onnx.cli", "serve", str(model_dir), "--port", str(port),
                                "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, output=process.stdout.read)
        yield url, process
    finally:
        stop(process)


def wait_healthy(url: str, process: subprocess.Popen, output, timeout_s: float = 60) -> None:
    """Until /health answers 200; the server's `output()` in the failure if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, output()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"not healthy after {timeout_s} s: {output()}")


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGINT (a graceful shutdown), then SIGKILL if it does not end in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(long_context_export):
    with running_server(long_context_export, "--max-batch", "8") as (url, _):
        yield url


@pytest.fixture(scope="module")
def engine(long_context_export) -> Engine:
    return Engine(long_context_export, threads=1)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"gpt2_onnx_{name} "):
            return float(line.split()[-1])
    return 0.0


def test_completions_equal_the_engine_greedy_and_seeded(client, engine):
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    expected = engine.generate(PROMPTS[0], max_new_tokens=24)
    assert greedy.choices[0].text == expected.text
    assert greedy.usage.completion_tokens == len(expected.token_ids)
    assert greedy.usage.prompt_tokens == expected.prompt_tokens
    sampled = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0.9, top_p=0.9,
                                        seed=5)
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, seed=5)
    assert sampled.choices[0].text == engine.generate(PROMPTS[1], config).text


def test_many_prompts_and_n_choices(client, engine):
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in answer.choices] == list(range(6))
    for choice in answer.choices:
        assert choice.text == engine.generate(PROMPTS[choice.index // 2], max_new_tokens=8).text


def test_streaming_through_the_openai_client(client, engine):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == engine.generate(PROMPTS[3], max_new_tokens=20).text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_strings(client, engine):
    text = engine.generate(PROMPTS[5], max_new_tokens=20).text
    stop = text[6:9]
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=20, temperature=0, stop=[stop])
    assert answer.choices[0].text == text[: text.find(stop)] and answer.choices[0].finish_reason == "stop"


def test_echo_and_logprobs_match_pytorch(client, engine):
    torch_model = _torch_model(engine)
    prompt = PROMPTS[5]
    ids = engine.encode(prompt)
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    with torch.inference_mode():
        reference = torch.log_softmax(torch_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    logprobs = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and "".join(logprobs.tokens) == prompt
    assert logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(logprobs.token_logprobs[1:], [reference[t, ids[t + 1]] for t in range(len(ids) - 1)],
                               atol=1e-4)
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset == [len(engine.tokenizer.decode(ids[:t])) for t in range(len(ids))]

    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=3,
                                          temperature=0)
    logprobs = generated.choices[0].logprobs
    new_ids = engine.generate(prompt, max_new_tokens=4).token_ids
    with torch.inference_mode():
        full = torch.log_softmax(torch_model(torch.tensor([ids + new_ids])).logits[0].double(), -1).numpy()
    assert len(logprobs.tokens) == len(ids) + 4
    np.testing.assert_allclose(logprobs.token_logprobs[1:], [full[t, token] for t, token in
                                                             enumerate((ids + new_ids)[1:])], atol=1e-4)
    for top, token in zip(logprobs.top_logprobs[len(ids):], logprobs.tokens[len(ids):]):
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy picks the most likely


def test_echo_with_several_prompts_and_choices(client, engine):
    """Each choice starts with its own prompt (prompts are tokenized and echoed once each, whatever their n)."""
    prompts = [PROMPTS[1], PROMPTS[2]]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=3, echo=True, temperature=0)
    assert len(answer.choices) == 6
    for choice in answer.choices:
        prompt = prompts[choice.index // 3]
        assert choice.text == prompt + engine.generate(prompt, max_new_tokens=3).text


def _torch_model(engine):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(engine.manifest.source).eval()


@pytest.mark.parametrize("payload, param", [
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "temperature": 5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "logprobs": 99}, "logprobs"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [70000]}, "prompt"),
    ({"prompt": "hi", "max_tokens": 2000}, "max_tokens"),
    ({"prompt": [11] * 1020}, "max_tokens"),  # no max_tokens: OpenAI's default of 16 must fit too
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),  # OpenAI bounds it to [-2, 2]
    ({"prompt": "hi", "n": 0}, "n"),
])
def test_bad_requests_get_400_naming_the_field(server, payload, param):
    response = httpx.post(f"{server}/v1/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_malformed_json_is_a_400(server):
    response = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-1024"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    for name in ("generated_tokens_total", "prompt_tokens_total", "queue_depth", "running",
                 "request_latency_seconds_bucket", "time_to_first_token_seconds_count"):
        assert f"gpt2_onnx_{name}" in text


def test_a_client_that_goes_away_frees_its_row(server):
    before = metric(server, "requests_cancelled_total")
    generated = metric(server, "generated_tokens_total")
    payload = {"prompt": "Once", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=payload) as response:
        next(response.iter_lines())  # one token arrived; now hang up
    with pytest.raises(httpx.ReadTimeout):  # the same without streaming: the client gives up waiting
        httpx.post(f"{server}/v1/completions", json={**payload, "stream": False}, timeout=0.3)
    deadline = time.monotonic() + 10
    while metric(server, "requests_cancelled_total") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "requests_cancelled_total") == before + 2
    assert metric(server, "running") == 0
    assert metric(server, "generated_tokens_total") - generated < 2000  # neither ran to the end


def test_load_32_clients_every_answer_complete_and_greedy_equals_engine(server, engine):
    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS), rng.randint(1, 40), rng.random() < 0.3, rng.random() < 0.5) for _ in range(256)]
    expected = {(p, n): engine.generate(p, max_new_tokens=n).text for p, n, sampled, _ in jobs if not sampled}

    def ask(job) -> tuple[str, str, int]:
        prompt, max_tokens, sampled, stream = job
        payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0 if sampled else 0, "stream": stream}
        if not stream:
            response = httpx.post(f"{server}/v1/completions", json=payload, timeout=120)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            return choice["text"], choice["finish_reason"], response.json()["usage"]["completion_tokens"]
        text, finish, events = "", None, 0
        with httpx.stream("POST", f"{server}/v1/completions", json=payload, timeout=120) as response:
            assert response.status_code == 200
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        for line in lines[:-1]:
            choice = json.loads(line)["choices"][0]
            text, finish, events = text + choice["text"], choice["finish_reason"] or finish, events + 1
        return text, finish, events

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, max_tokens, sampled, stream), (text, finish, count) in zip(jobs, answers):
        assert finish in ("length", "stop")
        assert count <= max_tokens
        if not sampled:
            assert text == expected[prompt, max_tokens]


def test_api_key_is_required_when_set(long_context_export):
    with running_server(long_context_export, "--api-key", "s3cret") as (url, _):
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}).status_code == 401
        wrong = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        answer = OpenAI(base_url=f"{url}/v1", api_key="s3cret").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert len(answer.choices) == 1


def test_a_full_queue_answers_429(long_context_export):
    with running_server(long_context_export, "--max-batch", "1", "--max-queue", "1") as (url, _):
        payload = {"prompt": "Once", "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=payload, timeout=60).status_code,
                                  range(6)))
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


def stream_in_background(url: str, max_tokens: int) -> tuple[threading.Thread, list[str]]:
    """A greedy streamed completion read by a thread; its lines arrive in the returned list."""
    lines: list[str] = []
    payload = {"prompt": "Once", "max_tokens": max_tokens, "temperature": 0, "stream": True}

    def read() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=60) as response:
            lines.extend(response.iter_lines())
    reader = threading.Thread(target=read)
    reader.start()
    return reader, lines


def test_shutdown_lets_in_flight_streams_finish(long_context_export):
    with running_server(long_context_export) as (url, process):
        reader, lines = stream_in_background(url, 600)
        while not lines and reader.is_alive():
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        reader.join(timeout=30)
        assert process.wait(timeout=30) == 0
    assert "data: [DONE]" in lines
