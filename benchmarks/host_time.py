"""Host time per generated token, early and late in a long generation: the work outside the graph
(token choice, detokenization, stop-string matching, streaming) must not grow with the output.

    python -m gpt2_onnx.benchmarks.host_time MODEL_DIR [--tokens 1000] [--threads 2]

Streams one greedy row with stop strings that never match, and times each step minus its decode call.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gpt2_onnx.engine import Engine, GenerationConfig
from gpt2_onnx.engine.loop import Batch

STOPS = ("\n\n\n\n\n\n", "<never-matches>", "THE END.")


def host_times(engine: Engine, tokens: int) -> np.ndarray:
    """Seconds of host work at each decode step (the step's wall time minus the graph's)."""
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, stop=STOPS)
    row = engine.new_row([engine.manifest.eos_token_id], config)
    decoder = engine.new_decoder()
    graph_s: list[float] = []
    decode = decoder.decode

    def timed_decode(ids):
        started = time.perf_counter()
        out = decode(ids)
        graph_s.append(time.perf_counter() - started)
        return out
    decoder.decode = timed_decode
    batch = Batch(decoder)
    batch.start([row], 1 + tokens)
    row.unsent_text()
    wall = []
    while True:
        batch.drop_finished()
        if not batch.rows:
            return np.array(wall) - np.array(graph_s)
        started = time.perf_counter()
        batch.step()
        row.unsent_text()  # streaming: what a client would be sent
        wall.append(time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    engine = Engine(args.model_dir, threads=args.threads)
    host = host_times(engine, args.tokens) * 1e6
    early, late = np.median(host[5:25]), np.median(host[-20:])
    print(json.dumps({"tokens": args.tokens, "host_us_median_tokens_5_25": round(float(early), 1),
                      "host_us_median_last_20": round(float(late), 1), "late_over_early": round(float(late / early), 3)}))


if __name__ == "__main__":
    main()
