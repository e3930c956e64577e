"""`gpt2-onnx serve --ray` as clients see it: a local Ray cluster (this process is its head), the CLI joining
it with 2 replicas, the official `openai` client and raw HTTP. The single-process server's API tests from
test_server.py run again here against the Ray deployment (their `server` fixture is this module's).

Slow (a Ray cluster on 2 cores): python -m pytest -m slow tests/test_ray.py
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
import yaml  # noqa: E402  (a dependency of ray)

from gpt2_onnx.serve.ray_metrics import PUSH_PERIOD_S  # noqa: E402

from tests import test_server as single  # noqa: E402
from tests.test_server import (MODEL, PROMPTS, client, engine, free_port, running_server, stop,  # noqa: E402,F401
                               stream_in_background, wait_healthy)

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLICA_CLASS = "ServeReplica:gpt2-onnx:gpt2-onnx"


@contextlib.contextmanager
def ray_cli(model_dir, log, *args: str):
    """`gpt2-onnx serve MODEL --ray ...` in its own process; SIGINT at the end."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "gpt2_onnx.cli", "serve", str(model_dir), "--ray",
                                    "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, output=lambda: open(log).read()[-3000:], timeout_s=180)
        yield url, process
    finally:
        stop(process, timeout_s=90)


def replica_metrics(url: str, name: str = "completion_requests_total") -> dict[str, float]:
    """Per replica (id -> value) from the deployment's /metrics."""
    prefix = f"gpt2_onnx_replica_{name}{{replica=\""
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)}


def replica_pids(url: str) -> set[int]:
    prefix = "gpt2_onnx_replica_info{"
    return {int(line.split('pid="')[1].split('"')[0])
            for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)}


def alive_replica_actors() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")])


def wait_for(condition, timeout_s: float, what: str, last_seen=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s} s{last_seen()}")


def settled_metrics(url: str) -> dict[str, float]:
    """Per-replica request counts once every replica's latest push has landed: two reads, three push periods
    apart, that agree (a read right after a request can show another replica's count from before it)."""
    last = replica_metrics(url)
    for _ in range(20):
        time.sleep(3 * PUSH_PERIOD_S)
        if (now := replica_metrics(url)) == last:
            return now
        last = now
    raise AssertionError(f"the replicas' request counts never settled: {last}")


def wait_counted(url: str, before: dict[str, float], requests: int, timeout_s: float = 30) -> dict[str, float]:
    """The per-replica request counts once the deployment's /metrics sums `requests` more than `before`."""
    seen: list = []

    def counted():
        seen[:] = [replica_metrics(url)]
        return sum(seen[0].values()) - sum(before.values()) == requests and seen[0]

    return wait_for(counted, timeout_s, f"{requests} requests counted",
                    lambda: f"; before {before}, last seen {seen}:\n{httpx.get(f'{url}/metrics').text[-3000:]}")


# -- a local Ray of the CLI's own: SIGINT or SIGTERM ends it ---------------------------------------------

@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_drains_and_stops_the_local_ray_within_60_s(long_context_export, tmp_path, signal_number):
    log = tmp_path / "local.log"
    with ray_cli(long_context_export, log, "--replicas", "1") as (url, process):
        reader, lines = stream_in_background(url, 300)
        wait_for(lambda: lines, 30, "the first streamed token")
        started = time.monotonic()
        process.send_signal(signal_number)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        stopped_s = time.monotonic() - started
        reader.join(timeout=30)
    print(f"local Ray stopped {stopped_s:.1f} s after {signal.Signals(signal_number).name}")
    assert "data: [DONE]" in lines  # the request in flight finished first
    assert "stopped in" in log.read_text()
    assert stopped_s < 60


# -- a cluster this process heads, the CLI joining it with 2 replicas -----------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    # 3 logical CPUs on 2 cores: the 2 replicas of the CLI's app and the 1 of the YAML test's fit together
    context = ray.init(address="local", num_cpus=3, include_dashboard=True, object_store_memory=200 * 1024**2,
                       logging_level="WARNING", log_to_driver=False)
    try:
        yield context
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, long_context_export, tmp_path_factory):
    log = tmp_path_factory.mktemp("ray") / "cli.log"
    address = ray_cluster.address_info["gcs_address"]
    with ray_cli(long_context_export, log, "--replicas", "2", "--threads", "1", "--max-batch", "8",
                 "--ray-address", address) as (url, _):
        wait_for(lambda: len(replica_pids(url)) == 2, 30, "both replicas reporting metrics")
        yield url


def test_greedy_answers_equal_the_single_process_server(server, long_context_export):
    ray_client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with running_server(long_context_export) as (url, _):
        plain = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for prompt in PROMPTS:
            expected = plain.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
            answer = ray_client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
            assert answer.choices[0].text == expected.choices[0].text and answer.usage == expected.usage
        streamed = ray_client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                                 stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected_text(plain, PROMPTS[0])


def expected_text(client_: OpenAI, prompt: str) -> str:
    return client_.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text


def test_64_requests_from_16_clients_complete_spread_over_both_replicas(server, engine):
    before = settled_metrics(server)
    rng = random.Random(1)
    jobs = [(rng.choice(PROMPTS), rng.randint(8, 48), rng.random() < 0.5) for _ in range(64)]

    def ask(job) -> str:
        prompt, max_tokens, stream = job
        payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if not stream:
            response = httpx.post(f"{server}/v1/completions", json=payload, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]
        with httpx.stream("POST", f"{server}/v1/completions", json=payload, timeout=120) as response:
            assert response.status_code == 200
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1])

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, max_tokens, _), text in zip(jobs, answers):
        assert text == engine.generate(prompt, max_new_tokens=max_tokens).text
    after = wait_counted(server, before, 64)
    served = {replica: after[replica] - before.get(replica, 0) for replica in after}
    print(f"requests per replica: {served}")
    assert len(served) == 2 and min(served.values()) > 0


# -- the single-process server's API tests, against the Ray deployment ----------------------------------------

test_completions_equal_the_engine_greedy_and_seeded = single.test_completions_equal_the_engine_greedy_and_seeded
test_many_prompts_and_n_choices = single.test_many_prompts_and_n_choices
test_streaming_through_the_openai_client = single.test_streaming_through_the_openai_client
test_stop_strings = single.test_stop_strings
test_echo_and_logprobs_match_pytorch = single.test_echo_and_logprobs_match_pytorch
test_bad_requests_get_400_naming_the_field = single.test_bad_requests_get_400_naming_the_field
test_malformed_json_is_a_400 = single.test_malformed_json_is_a_400
test_models_health_and_metrics = single.test_models_health_and_metrics
test_a_client_that_goes_away_frees_its_row = single.test_a_client_that_goes_away_frees_its_row
test_load_32_clients_every_answer_complete_and_greedy_equals_engine = \
    single.test_load_32_clients_every_answer_complete_and_greedy_equals_engine


# -- the YAML config, as an operator deploys it ---------------------------------------------------------------

def test_the_yaml_config_deploys_with_serve_deploy(server, ray_cluster, long_context_export, engine, tmp_path):
    config = yaml.safe_load(open(os.path.join(REPO, "docs", "ray-serve.yaml")))
    config["http_options"] = {"host": "127.0.0.1", "port": int(server.rsplit(":", 1)[1])}  # Serve's, already running
    app = config["applications"][0]
    app.update(name="gpt2-onnx-yaml", route_prefix="/yaml")
    app["args"].update(model_dir=str(long_context_export), replicas=1, max_batch=4)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run([os.path.join(os.path.dirname(sys.executable), "serve"), "deploy", str(path),
                             "--address", f"http://{ray_cluster.dashboard_url}"], capture_output=True, text=True,
                            timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    try:
        url = f"{server}/yaml"
        wait_for(lambda: httpx.get(f"{url}/v1/models").status_code == 200, 120, "the YAML app answering")
        answer = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).completions.create(
            model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0)
        assert answer.choices[0].text == engine.generate(PROMPTS[2], max_new_tokens=16).text
    finally:
        serve.delete("gpt2-onnx-yaml")


# -- a lost replica (last: it disturbs the deployment) -------------------------------------------------------

def test_a_killed_replica_fails_its_requests_clearly_and_ray_replaces_it(server, engine):
    actors = alive_replica_actors()
    assert len(actors) == 2
    victim = actors[0].pid
    payload = {"prompt": PROMPTS[1], "max_tokens": 1000, "temperature": 0}
    expected = engine.generate(PROMPTS[1], max_new_tokens=1000).text
    started = threading.Event()

    def ask(i: int) -> str:
        stream = i % 2 == 0
        started.set()
        try:
            if not stream:
                response = httpx.post(f"{server}/v1/completions", json=payload, timeout=60)
                if response.status_code != 200:
                    return f"HTTP {response.status_code}: {response.text[:200]}"
                return "ok" if response.json()["choices"][0]["text"] == expected else "wrong text"
            with httpx.stream("POST", f"{server}/v1/completions", json={**payload, "stream": True},
                              timeout=60) as response:
                if response.status_code != 200:
                    return f"HTTP {response.status_code}: {response.read()[:200]!r}"
                lines = list(response.iter_lines())
            return "ok" if "data: [DONE]" in lines else f"stream ended early: {lines[-2:]}"
        except httpx.TimeoutException as exc:
            return f"hung: {exc!r}"
        except httpx.HTTPError as exc:  # the connection cut mid-answer
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, i) for i in range(32)]
        started.wait()
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        outcomes = [f.result(timeout=90) for f in futures]
    failures = [o for o in outcomes if o != "ok"]
    print(f"{len(outcomes) - len(failures)} completed, {len(failures)} failed: {sorted(set(failures))}")
    # Ray's proxy answers a request lost with its replica 500 (before any byte) or cuts the stream before [DONE]
    assert all(o.startswith(("HTTP 500", "RemoteProtocolError", "ReadError")) for o in failures), failures
    assert len(failures) <= 16 + 8  # at most what the lost replica held (its batch and its queue)

    replaced = wait_for(lambda: len(a := alive_replica_actors()) == 2 and victim not in {x.pid for x in a} and a,
                        120, "Ray bringing a second replica back")
    pids = {actor.pid for actor in replaced}
    wait_for(lambda: replica_pids(server) == pids, 30, "the new replica reporting metrics")
    before = settled_metrics(server)
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda p: OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
                              .completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
                              .choices[0].text, PROMPTS * 2))
    assert texts == [engine.generate(p, max_new_tokens=16).text for p in PROMPTS * 2]
    after = wait_counted(server, before, 16)
    assert all(after[r] > before.get(r, 0) for r in after), (before, after)  # both replicas served
