"""Ray Serve's configuration without a cluster: the CLI's options, the deployment options they become, the
YAML builder's arguments, and the deployment-wide metrics summed from per-replica snapshots."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray.serve")

from gpt2_onnx.cli import main  # noqa: E402
from gpt2_onnx.engine.metrics import Metrics  # noqa: E402
from gpt2_onnx.errors import Gpt2OnnxError  # noqa: E402
from gpt2_onnx.serve.app import ServerConfig  # noqa: E402
from gpt2_onnx.serve.ray_app import RaySpec, build, parse_autoscale  # noqa: E402
from gpt2_onnx.serve.ray_metrics import STALE_S, Board, render, snapshot  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2"], "need --ray"),
    (["--ray-address", "10.0.0.1:6379"], "need --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:3"], "not both"),
], ids=["replicas-without-ray", "address-without-ray", "replicas-and-autoscale"])
def test_ray_options_that_contradict_are_refused(tmp_path, capsys, argv, message):
    assert main(["serve", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_replicas_and_threads_become_ray_resources():
    options = RaySpec("/m", ServerConfig(max_batch=8, max_queue=32), threads=2, replicas=3).deployment_options()
    assert options["num_replicas"] == 3 and options["ray_actor_options"] == {"num_cpus": 2}
    assert options["max_ongoing_requests"] == 40  # the scheduler's own batch + queue: past that it answers 429
    assert options["graceful_shutdown_timeout_s"] == ServerConfig().graceful_shutdown_s


def test_autoscale_becomes_ray_autoscaling_config():
    assert parse_autoscale("1:4") == (1, 4)
    options = RaySpec("/m", ServerConfig(max_batch=16), autoscale=(1, 4)).deployment_options()
    assert options["num_replicas"] == "auto"
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                             "target_ongoing_requests": 16}
    for bad in ("4", "a:b", "1-4"):
        with pytest.raises(Gpt2OnnxError, match="MIN:MAX"):
            parse_autoscale(bad)
    with pytest.raises(Gpt2OnnxError, match="MIN <= MAX"):
        RaySpec("/m", autoscale=(3, 1))


def test_yaml_builder_checks_its_args(tmp_path):
    with pytest.raises(Gpt2OnnxError, match="model_dir"):
        build({"replicas": 2})
    with pytest.raises(Gpt2OnnxError, match="unknown application arg"):
        build({"model_dir": str(tmp_path), "replica": 2})
    assert build({"model_dir": str(tmp_path), "replicas": 2, "max_batch": 4, "api_key": "k"}) is not None


def _snapshot(name: str, requests: int, running: int, latency: float):
    metrics = Metrics(gauges={"running": lambda: running, "alive": lambda: 1})
    metrics.count("completion_requests_total", requests)
    metrics.count("http_responses_total", requests, labels={"route": "/v1/completions", "status": "200"})
    metrics.observe("request_latency_seconds", latency)
    return snapshot(metrics, name, "node-a")


def test_deployment_metrics_are_the_sum_of_the_replicas():
    text = render([_snapshot("r1", 3, 2, 0.2), _snapshot("r2", 5, 1, 7.0)])
    lines = set(text.splitlines())
    assert {"gpt2_onnx_completion_requests_total 8", "gpt2_onnx_running 3", "gpt2_onnx_alive 2",
            "gpt2_onnx_replicas 2", 'gpt2_onnx_http_responses_total{route="/v1/completions",status="200"} 8',
            'gpt2_onnx_request_latency_seconds_bucket{le="0.25"} 1', 'gpt2_onnx_request_latency_seconds_count 2',
            'gpt2_onnx_replica_completion_requests_total{replica="r1"} 3',
            'gpt2_onnx_replica_completion_requests_total{replica="r2"} 5',
            'gpt2_onnx_replica_http_responses_total{replica="r2",route="/v1/completions",status="200"} 5',
            'gpt2_onnx_replica_running{replica="r1"} 2'} <= lines
    assert sum(line.startswith("gpt2_onnx_replica_info{") for line in lines) == 2


def test_a_replica_not_heard_from_leaves_the_sums():
    board = Board()
    board.put(_snapshot("r1", 3, 0, 0.1))
    old = _snapshot("gone", 100, 0, 0.1)
    board.put(type(old)(**{**old.__dict__, "taken": time.time() - STALE_S - 1}))
    assert "gpt2_onnx_completion_requests_total 3" in board.render().splitlines()
    assert list(board.latest) == ["r1"]


def test_a_snapshot_that_lands_late_never_steps_a_counter_back():
    board = Board()
    earlier, later = _snapshot("r1", 3, 0, 0.1), _snapshot("r1", 4, 0, 0.1)
    earlier = type(earlier)(**{**earlier.__dict__, "taken": later.taken - 1})
    board.put(later)
    board.put(earlier)  # the pusher's, sent before the /metrics handler's but delivered after it
    assert "gpt2_onnx_completion_requests_total 4" in board.render().splitlines()


def test_a_replica_whose_scheduler_died_fails_its_health_check():
    from types import SimpleNamespace

    from gpt2_onnx.serve.ray_app import Gpt2OnnxReplica

    dead = SimpleNamespace(scheduler=SimpleNamespace(alive=False, death="the scheduler stopped: boom"))
    with pytest.raises(RuntimeError, match="boom"):  # Ray then replaces the replica
        Gpt2OnnxReplica.check_health(dead)
    Gpt2OnnxReplica.check_health(SimpleNamespace(scheduler=SimpleNamespace(alive=True, death=None)))
