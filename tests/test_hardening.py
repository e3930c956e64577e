"""The server attacked: poison requests, faults injected into one row or the loop, oversized and malformed
bodies, forged metric labels. Each test is a row of the hardening issue's table, or one of its fault cases."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest

from gpt2_onnx.engine import Engine, GenerationConfig
from gpt2_onnx.engine.scheduler import Job, Scheduler, SchedulerConfig, Unavailable

from .test_server import MODEL, PROMPTS, running_server


@pytest.fixture(scope="module")
def engine(long_context_export) -> Engine:
    return Engine(long_context_export, threads=1)


@pytest.fixture(scope="module")
def server(long_context_export):
    with running_server(long_context_export, "--max-batch", "8", "--max-queue", "32",
                        "--max-body", str(1024 * 1024)) as (url, process):
        yield url, process


def post(url: str, payload, **kwargs) -> httpx.Response:
    """JSON as Python writes it: NaN and Infinity included, lone surrogates escaped, as a hostile client may."""
    return httpx.post(f"{url}/v1/completions", content=json.dumps(payload).encode(),
                      headers={"content-type": "application/json"}, timeout=kwargs.pop("timeout", 60), **kwargs)


# -- isolation in the scheduler (in process, faults injected) ---------------------------------------

class Collector:
    """A job's events, and when its last one came."""

    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.finish_reason:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def run_jobs(engine: Engine, prompts: list[str], config: GenerationConfig, prepare=None) -> list[Collector]:
    """Submit one job per prompt in one turn (so they are admitted together) and wait for all."""
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8, max_queue=32))
    collectors = [Collector() for _ in prompts]
    jobs = [Job(engine.new_row(p, config), c, index=i) for i, (p, c) in enumerate(zip(prompts, collectors))]
    if prepare:
        prepare(scheduler, jobs)
    scheduler.submit(jobs)
    scheduler.start()
    try:
        assert all(c.done.wait(60) for c in collectors), [c.events[-1:] for c in collectors]
    finally:
        scheduler.stop()
    return collectors


def alone(engine: Engine, prompt: str, config: GenerationConfig) -> str:
    return engine.generate(prompt, config).text


def test_a_whole_answer_gets_one_event_with_everything_a_stream_gets(engine):
    """Jobs answered whole wake their listener once, at the end, with the text and log-probabilities a
    streamed job receives token by token."""
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4))
    config = GenerationConfig(max_new_tokens=24, temperature=0)
    streamed, whole = Collector(), Collector()
    scheduler.submit([Job(engine.new_row("Once upon", config, logprobs=2), streamed, 0),
                      Job(engine.new_row("Once upon", config, logprobs=2), whole, 1, stream=False)])
    scheduler.start()
    try:
        assert streamed.done.wait(60) and whole.done.wait(60)
    finally:
        scheduler.stop()
    assert len(whole.events) == 1 and len(streamed.events) >= 24
    assert whole.text == streamed.text and whole.finish == streamed.finish == "length"
    assert whole.events[0].logprobs == [e for event in streamed.events for e in event.logprobs]


CONFIG = GenerationConfig(max_new_tokens=24)


def test_a_failing_token_choice_ends_its_row_alone(engine):
    def poison(scheduler, jobs):
        def choose(logits):
            raise FloatingPointError("injected into sampling")
        jobs[2].row.choose = choose
    got = run_jobs(engine, PROMPTS[:5], CONFIG, poison)
    assert got[2].finish == "error" and "injected into sampling" in got[2].events[-1].error
    for i in (0, 1, 3, 4):
        assert got[i].finish in ("length", "eos", "stop") and got[i].text == alone(engine, PROMPTS[i], CONFIG)


def test_a_failing_prefill_ends_its_request_alone_and_later_ones_are_admitted(engine):
    passes = []

    def poison(scheduler, jobs):
        decoder = scheduler.batch.decoder
        add, add_many = decoder.add, decoder.add_many

        def failing_add(prompt, all_logits=False):
            if prompt == jobs[1].row.prompt:
                raise RuntimeError("injected into prefill")
            return add(prompt, all_logits)

        def failing_add_many(prompts):  # a pass over several prompts fails if one of them is the poisoned one
            passes.append(len(prompts))
            if jobs[1].row.prompt in prompts:
                raise RuntimeError("injected into prefill")
            return add_many(prompts)
        decoder.add, decoder.add_many = failing_add, failing_add_many
    prompts = ["Hello there", "Hello world", "Hello again", "Hi you"]  # similar lengths: one pass together
    got = run_jobs(engine, prompts, CONFIG, poison)
    assert passes and max(passes) > 1  # they were tried together, then one by one
    assert got[1].finish == "error" and "injected into prefill" in got[1].events[-1].error
    for i in (0, 2, 3):  # admitted in the same turn as the poison: each gets its answer
        assert got[i].text == alone(engine, prompts[i], CONFIG)


def test_a_failing_decode_step_fails_the_running_rows_and_the_scheduler_goes_on(engine):
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4, max_queue=8))
    decode, failures = scheduler.batch.decoder.decode, [3]

    def flaky(tokens):
        failures[0] -= 1
        if failures[0] == 0:
            raise RuntimeError("injected into decode")
        return decode(tokens)
    scheduler.batch.decoder.decode = flaky
    first = [Collector() for _ in range(2)]
    scheduler.submit([Job(engine.new_row(p, CONFIG), c, i) for i, (p, c) in enumerate(zip(PROMPTS, first))])
    scheduler.start()
    try:
        assert all(c.done.wait(30) for c in first)
        assert {c.finish for c in first} == {"error"} and "injected into decode" in first[0].events[-1].error
        later = Collector()
        scheduler.submit([Job(engine.new_row(PROMPTS[3], CONFIG), later)])
        assert later.done.wait(30) and later.text == alone(engine, PROMPTS[3], CONFIG)
    finally:
        scheduler.stop()


def test_a_failing_event_callback_drops_only_its_row(engine):
    broken_calls = []

    def poison(scheduler, jobs):
        collector = jobs[0].emit

        def broken(event):
            broken_calls.append(event)
            collector.done.set()  # run_jobs need not wait for it
            raise ConnectionError("the listener is gone")
        jobs[0].emit = broken
    got = run_jobs(engine, PROMPTS[:3], CONFIG, poison)
    assert len(broken_calls) == 1  # it failed once, then its row left the batch
    assert [c.text for c in got[1:]] == [alone(engine, p, CONFIG) for p in PROMPTS[1:3]]


def test_a_dead_scheduler_turns_health_503_and_refuses_new_work(long_context_export):
    from gpt2_onnx.serve.app import ServerConfig, create_app

    engine = Engine(long_context_export, threads=1)
    app = create_app(engine, ServerConfig())
    scheduler = app.app.state.scheduler

    def die(*args):
        raise SystemExit("injected: the loop itself died")
    scheduler._turn = die
    waiting = Collector()
    scheduler.submit([Job(engine.new_row("Hi", CONFIG), waiting)])
    scheduler.start()
    assert waiting.done.wait(10) and waiting.finish == "error"  # told, not left hanging
    assert not scheduler.alive and "injected" in scheduler.death
    with pytest.raises(Unavailable):
        scheduler.submit([Job(engine.new_row("Hi", CONFIG), Collector())])

    async def ask() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.get("/health"), await client.post("/v1/completions", json={"prompt": "Hi"})
    health, completion = asyncio.run(ask())
    assert health.status_code == 503 and "injected" in health.json()["status"]
    assert completion.status_code == 503 and completion.json()["error"]["code"] == "unavailable"


@pytest.mark.parametrize("options", [dict(temperature=1e-40), dict(temperature=1e-40, top_p=0.5),
                                     dict(temperature=100.0), dict(repetition_penalty=100.0, temperature=1.0)])
def test_extreme_sampling_settings_never_produce_nan(engine, options):
    config = GenerationConfig(max_new_tokens=16, do_sample=True, seed=0, **options)
    assert engine.generate("Hello", config).finish_reason in ("length", "eos")


# -- the HTTP front door (a real server process) ------------------------------------------------------

def test_a_poison_request_among_concurrent_streams_harms_nobody(server, engine):
    url, _ = server
    expected = {p: engine.generate(p, max_new_tokens=80).text for p in PROMPTS}

    def stream(prompt: str) -> str:
        text = ""
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"prompt": prompt, "max_tokens": 80, "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    body = json.loads(line[6:])
                    assert "error" not in body, body
                    text += body["choices"][0]["text"]
        return text

    poisons = [{"prompt": "hi", "temperature": 1e-40, "max_tokens": 8},
               {"prompt": "hi", "repetition_penalty": 1e-40, "temperature": 1.0},
               {"prompt": "hi", "temperature": float("nan")}]
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, p) for p in PROMPTS]
        time.sleep(0.2)
        codes = [post(url, p).status_code for p in poisons]
        texts = [s.result() for s in streams]
    assert texts == [expected[p] for p in PROMPTS]
    assert codes == [200, 400, 400]


def test_the_api_key_is_checked_before_the_body_is_read(long_context_export):
    with running_server(long_context_export, "--api-key", "k", "--max-body", str(64 * 1024 * 1024)) as (url, process):
        rss = psutil.Process(process.pid).memory_info().rss

        def body():  # 48 MB, streamed in chunks: the server must answer before reading it
            chunk = b"x" * (1024 * 1024)
            for _ in range(48):
                yield chunk
        started = time.monotonic()
        try:
            response = httpx.post(f"{url}/v1/completions", content=body(), timeout=30,
                                  headers={"content-type": "application/json"})
            status = response.status_code
        except httpx.HTTPError:  # the server may close the connection once it has answered
            status = 401
        assert status == 401 and time.monotonic() - started < 10
        malformed = httpx.post(f"{url}/v1/completions", content=b"{not json",
                               headers={"content-type": "application/json"})
        assert malformed.status_code == 401  # no key: 401 before any parsing
        assert psutil.Process(process.pid).memory_info().rss - rss < 20 * 1024 * 1024


def test_bodies_over_the_limit_are_refused_with_413(server):
    url, _ = server
    big = {"prompt": "x" * (2 * 1024 * 1024)}
    response = post(url, big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():
        yield b'{"prompt": "'
        for _ in range(3):
            yield b"y" * (512 * 1024)
        yield b'"}'
    response = httpx.post(f"{url}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_metrics_labels_are_bounded_and_escaped(server):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server
    for i in range(50):
        assert httpx.get(f"{url}/a{i}").status_code == 404
    forged = httpx.get(f"{url}/x%22%7D%201%0Afake_metric%209")
    assert forged.status_code == 404 and forged.json()["error"]["code"] == "not_found"
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: nothing forged
    assert "fake_metric" not in families
    routes = {s.labels["route"] for s in families["gpt2_onnx_http_responses"].samples}
    assert routes <= {"unmatched", "/v1/completions", "/metrics", "/health", "/v1/models", "/", "/tokenize",
                      "/detokenize", "/tokenizer_info", "/manifest", "/attention"}


@pytest.mark.parametrize("payload, param", [
    ({"prompt": [[1]] * 5000, "max_tokens": 1}, "prompt"),  # more rows than a request may have
    ({"prompt": "hi", "n": 16, "max_tokens": 1}, None),  # 16 rows: within the server's bounds, answered
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": ["a"] * 100}, "stop"),
    ({"prompt": "hi", "top_p": float("nan")}, "top_p"),
    ({"prompt": "hi", "max_tokens": float("inf")}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
])
def test_bad_requests_are_400_in_openais_shape(server, payload, param):
    url, _ = server
    response = post(url, payload)
    if param is None:
        assert response.status_code == 200
        return
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_huge_request_is_refused_before_work_and_health_stays_fast(server):
    url, _ = server
    payload = {"prompt": [[1]] * 100_000, "max_tokens": 1}  # ~1 MB of JSON, 100,000 rows asked for
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post, url, payload)
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=10)
        health_s = time.monotonic() - started
    assert big.result().status_code in (400, 413) and health.status_code == 200 and health_s < 2


def test_invalid_utf8_and_unknown_routes_and_models_answer_in_openais_shape(server):
    url, _ = server
    bad = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": []})
    assert chat.status_code == 404 and "chat" in chat.json()["error"]["message"]
    wrong = post(url, {"prompt": "hi", "model": "gpt-3.5"})
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
    assert post(url, {"prompt": "hi", "model": MODEL, "max_tokens": 2}).status_code == 200


def test_rows_beyond_the_queue_are_400_and_a_full_queue_is_429_with_retry_after(long_context_export):
    with running_server(long_context_export, "--max-batch", "1", "--max-queue", "2") as (url, _):
        too_many = post(url, {"prompt": "hi", "n": 3, "max_tokens": 2})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        payload = {"prompt": "Once", "max_tokens": 300, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(url, payload), range(6)))
        full = [r for r in responses if r.status_code == 429]
        assert full and all(r.headers["retry-after"] for r in full)


def test_a_request_past_its_timeout_ends_with_504(long_context_export):
    with running_server(long_context_export, "--request-timeout", "0.3", "--max-batch", "1") as (url, _):
        slow = post(url, {"prompt": "Once", "max_tokens": 1000, "temperature": 0})
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        assert post(url, {"prompt": "Hi", "max_tokens": 2}).status_code == 200  # the row was freed


def test_the_server_refuses_bad_limits_at_start_up(long_context_export):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "serve", str(long_context_export),
                           "--max-queue", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--max-queue" in done.stderr and "Traceback" not in done.stderr


def test_stop_strings_never_cost_more_than_the_new_text(engine):
    """Matching stop strings scans only what each token added (the whole text would be O(n) a token)."""
    config = GenerationConfig(max_new_tokens=200, min_new_tokens=200, stop=("<never>", "zzzz"))
    row = engine.new_row([50256], config)
    scanned = []
    from gpt2_onnx.engine import loop

    original = loop.Row._find_stop

    def spy(self, before):
        scanned.append(len(self.text.text) - max(0, before - 6))
        return original(self, before)
    loop.Row._find_stop = spy
    try:
        for _ in engine.decode_steps([row]):
            pass
    finally:
        loop.Row._find_stop = original
    assert len(row.new_ids) == 200 and max(scanned) < 64  # bounded by one token's text, not the whole text
    assert np.mean(scanned) < 16
