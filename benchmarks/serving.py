"""The HTTP server under load: N concurrent clients, each sending its requests one after another.

Reports aggregate generated tokens/s and request latency p50/p99 per concurrency level, measured from a
real `gpt2-onnx serve` process on 127.0.0.1 (bounded: a fixed number of requests per client).

    python -m gpt2_onnx.benchmarks.serving MODEL_DIR [--requests 32] [--tokens 12] [--rounds 3]

prints how much faster the same requests finish sent together than one after another (alternating rounds
on one server): on a tiny model that is the server's per-request and per-token host cost.

The clients are `Connection`s: keep-alive HTTP/1.1 on asyncio streams, opened before the clock starts, as a
client that reuses its connections sees the server. (With httpx's pool as the client, its own cost on these
two cores hid the server's: the same server measured a tiny-model gain of ~2.7 through httpx with new
connections every round, ~1.6 through one httpx client with 32 pooled connections, ~3.1 this way.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SERVED_PROMPT = 32  # tokens in each load request's prompt


def serving_load(folder: Path, threads: int, levels: tuple[int, ...], requests_per_client: int, new_tokens: int,
                 vocab_size: int, prompt_tokens: int = SERVED_PROMPT, log: Callable[[str], None] = print) -> list[dict]:
    with _server(folder, threads, max_batch=max(levels)) as url:
        results = []
        for clients in levels:
            log(f"  {clients} concurrent clients x {requests_per_client} requests of {new_tokens} tokens")
            results.append(asyncio.run(_load(url, clients, requests_per_client, new_tokens, prompt_tokens, vocab_size)))
        return results


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads JSON answers of a known length."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.host, self.port = host, int(port)

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def post(self, path: str, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(body)}\r\n\r\n".encode() + body)
        status = (await self.reader.readline()).split(b" ", 2)
        length = None
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"{path}: an answer without content-length ({status})")
        answer = await self.reader.readexactly(length)
        if len(status) < 2 or status[1] != b"200":
            raise RuntimeError(f"{path}: HTTP {status[1:2]}: {answer[:300]!r}")
        return json.loads(answer)

    def close(self) -> None:
        self.writer.close()


async def _connections(url: str, count: int) -> list[Connection]:
    return list(await asyncio.gather(*(Connection(url).open() for _ in range(count))))


async def _load(url: str, clients: int, per_client: int, new_tokens: int, prompt_tokens: int, vocab_size: int,
                connections: list[Connection] | None = None) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests one after another on its own
    connection (`connections`, or new ones opened before the clock starts)."""
    own = connections is None
    connections = await _connections(url, clients) if own else connections[:clients]
    rng = np.random.default_rng(clients)
    latencies, tokens = [], 0

    async def client(connection: Connection) -> None:
        nonlocal tokens
        for _ in range(per_client):
            ids = rng.integers(0, min(vocab_size, 50000), prompt_tokens).tolist()
            payload = {"prompt": ids, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0}
            start = time.perf_counter()
            answer = await connection.post("/v1/completions", payload)
            latencies.append(time.perf_counter() - start)
            tokens += answer["usage"]["completion_tokens"]

    try:
        start = time.perf_counter()
        await asyncio.gather(*(client(connection) for connection in connections))
        wall = time.perf_counter() - start
    finally:
        for connection in connections if own else ():
            connection.close()
    return {"clients": clients, "requests": len(latencies), "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "latency_s": {"p50": float(np.percentile(latencies, 50)),
                                                          "p99": float(np.percentile(latencies, 99))}}


@contextlib.contextmanager
def _server(folder: Path, threads: int, max_batch: int, flags: tuple[str, ...] = (), startup_s: float = 120):
    """A `gpt2-onnx serve` process on a free port (with `flags`, e.g. --ray); its URL once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server (Ray) would fill it and block
    process = subprocess.Popen([sys.executable, "-m", "gpt2_onnx.cli", "serve", str(folder), "--port", str(port),
                                "--threads", str(threads), "--max-batch", str(max_batch), *flags],
                               stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited: {log.read().decode(errors='replace').strip()[-500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up within {startup_s:g} s")
            time.sleep(0.2)
        yield url
    finally:
        log.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def concurrency_gain(folder: Path, threads: int, requests: int, new_tokens: int, rounds: int,
                     prompt_tokens: int = 16) -> list[dict]:
    """Wall time of `requests` greedy requests sent one after another (one connection), then all at once
    (one connection each), per round."""
    with _server(folder, threads, max_batch=requests) as url:
        return asyncio.run(_gain_rounds(url, requests, new_tokens, rounds, prompt_tokens))


async def _gain_rounds(url: str, requests: int, new_tokens: int, rounds: int, prompt_tokens: int) -> list[dict]:
    vocab = 50000
    connections = await _connections(url, requests)
    try:
        await _load(url, requests, 1, new_tokens, prompt_tokens, vocab, connections)  # warm-up
        out = []
        for _ in range(rounds):
            sequential = await _load(url, 1, requests, new_tokens, prompt_tokens, vocab, connections)
            concurrent = await _load(url, requests, 1, new_tokens, prompt_tokens, vocab, connections)
            out.append({"sequential_s": round(sequential["wall_s"], 3), "concurrent_s": round(concurrent["wall_s"], 3),
                        "gain": round(sequential["wall_s"] / concurrent["wall_s"], 2)})
        return out
    finally:
        for connection in connections:
            connection.close()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="requests sent together vs one after another")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rounds = concurrency_gain(args.model_dir, args.threads, args.requests, args.tokens, args.rounds)
    print(json.dumps({"requests": args.requests, "new_tokens": args.tokens, "rounds": rounds,
                      "median_gain": float(np.median([r["gain"] for r in rounds]))}))


if __name__ == "__main__":
    main()
