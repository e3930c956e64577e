"""The fixed cost of a decode step: gpt2's graph (12 layers, the same ops and nodes) with almost no weights.

    python -m gpt2_onnx.benchmarks.step_overhead [--threads 2] [--steps 200]

A GPT-2 with n_embd 96 (12 heads of 8) keeps every node of the gpt2 graph but streams ~1/40 of its
weights, so its step time is what the op dispatch, the threading and the small ops cost per token: the
part of a decode step that the weight-bandwidth floor (weights per token / bandwidth) does not count.
Exports int8, int4 (main graph only) and fp32 into a temporary folder and prints the median step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

NARROW = dict(n_layer=12, n_head=12, n_embd=96)


def step_ms(model_dir: Path, threads: int, steps: int) -> float:
    from gpt2_onnx.engine import Engine

    from .profile_step import WARMUP, median_step_ms

    decoder = Engine(model_dir, threads=threads).batched_from(None).new_decoder()
    decoder.allocate(1, 32 + WARMUP + steps)
    decoder.add(list(range(32)))
    return median_step_ms(decoder, np.zeros(1, np.int64), steps)


def main() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_onnx.export import QuantConfig, export_model
    from gpt2_onnx.export.load import gpt2_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "narrow"
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**NARROW)).save_pretrained(checkpoint)
        gpt2_tokenizer().save_pretrained(checkpoint)
        recipes = {"int8": QuantConfig.int8(), "int4": replace(QuantConfig.int4(), batched_graph=False),
                   "fp32": QuantConfig.fp32()}
        out = {}
        for name, quant in recipes.items():
            folder = export_model(str(checkpoint), Path(tmp) / name, quant=quant, eval_windows=0,
                                  log=lambda _: None).out_dir
            out[name] = round(step_ms(folder, args.threads, args.steps), 3)
    print(json.dumps({"shape": NARROW, "threads": args.threads, "step_ms": out}))


if __name__ == "__main__":
    main()
