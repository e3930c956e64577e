"""The plain server vs Ray Serve on one machine, same load: `python -m gpt2_onnx.serve.ray_bench MODEL_DIR`.

Runs, one after another, each as its own `gpt2-onnx serve` process (a Ray one starts its own local Ray):
the plain server with 2 threads, Ray with 1 replica x 2 threads (the proxy's cost alone), Ray with
2 replicas x 1 thread (two engines on the same cores). Each gets the same loads (benchmarks/serving.py's
clients: greedy, random prompt ids, every request generates exactly its tokens) and a markdown row per load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path

import httpx

from gpt2_onnx.benchmarks.serving import _load, _server
from gpt2_onnx.engine.manifest import Manifest

SYSTEMS = {"plain, 2 threads": (2, []), "ray, 1 replica x 2 threads": (2, ["--ray", "--replicas", "1"]),
           "ray, 2 replicas x 1 thread": (1, ["--ray", "--replicas", "2"])}  # name -> (threads, flags)
LOADS = ((1, 20, 1), (1, 6, 64), (8, 4, 64), (32, 2, 64))  # (clients, requests per client, new tokens)


@contextlib.contextmanager
def server(model_dir: str, threads: int, flags: list[str]):
    with _server(Path(model_dir), threads, max_batch=32, flags=tuple(flags), startup_s=180) as url:
        time.sleep(3)  # every replica up (serve.run returns once all are running; health answers earlier)
        httpx.post(f"{url}/v1/completions", json={"prompt": "warm", "max_tokens": 8}, timeout=60)
        yield url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    args = parser.parse_args(argv)
    vocab = Manifest.read(Path(args.model_dir)).vocab_size
    print("| system | clients | requests | new tokens | tokens/s | p50 s | p99 s |\n|---|---|---|---|---|---|---|")
    for name, (threads, flags) in SYSTEMS.items():
        with server(args.model_dir, threads, flags) as url:
            for clients, per_client, new_tokens in LOADS:
                r = asyncio.run(_load(url, clients, per_client, new_tokens, 32, vocab))
                print(f"| {name} | {clients} | {r['requests']} | {new_tokens} | {r['tokens_per_s']:.0f} | "
                      f"{r['latency_s']['p50']:.3f} | {r['latency_s']['p99']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
