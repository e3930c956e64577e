"""llama.cpp alone, without the rest of the suite: build or find it, convert and quantize the checkpoint,
run its own tools, and check its greedy tokens against PyTorch's on the suite's prompt.

    python -m gpt2_onnx.benchmarks.llamacpp_peer --model random:gpt2 --threads 2
    python -m gpt2_onnx.benchmarks.llamacpp_peer --llama-cpp ~/src/llama.cpp --precisions q8_0 --json out.json

Prints a Markdown table (prefill, ms per token at each context, decode tokens/s by batch, greedy agreement,
max |Δlogit| after the prefill) and the exact tool commands. The suite (`gpt2-onnx bench`) uses the same
pieces: `make_systems` for the timed runs, `tool_results` for the tools' own figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError, first_line

from .exports import ExportCache
from .fidelity import greedy_agreement
from .llamacpp import PRECISIONS, gguf_model, llama_cpp
from .llamacpp_bench import tool_results
from .measure import Point, prompt_ids
from .report import agreement_text, cell


@dataclass(frozen=True)
class PeerConfig:
    source: str = "random:gpt2"
    llama_cpp: Path | None = None  # an existing build; None: build the pinned version once (cached)
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    threads: int = 2
    reps: int = 3
    contexts: tuple[int, ...] = (32,)  # prompt lengths: prefill of each, ms per token after each
    new_tokens: int = 128
    batches: tuple[int, ...] = (1, 4, 16, 64)  # llama-batched-bench: 32-token prompts, 16 new tokens a row
    cache: Path | None = None


def greedy_parity(system, checkpoint: Path, prompt: np.ndarray, new_tokens: int) -> dict:
    """llama.cpp's greedy tokens for `prompt` [1, L] against PyTorch fp32's, and the largest logit gap
    after the prefill."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    ids = torch.from_numpy(prompt)
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id)[0, ids.shape[1]:]
        logits = model(ids).logits[0, -1].numpy()
    got = system.run(prompt, new_tokens, logits=True)
    agreement = greedy_agreement({"pytorch": want.numpy(), "llama": got.tokens[0]})["llama"]
    return {**agreement, "max_abs_logit_diff": float(np.abs(system.first_logits - logits).max())}


def run_peer(config: PeerConfig, log=print) -> dict:
    from .systems import LlamaCppSystem

    cache = ExportCache(config.source, config.cache, log=log)
    llama = llama_cpp(config.llama_cpp, log=log)
    latency = [Point(1, context, config.new_tokens) for context in config.contexts]
    throughput = [Point(b, 32, 16) for b in config.batches]
    vocab = json.loads((cache.checkpoint() / "config.json").read_text())["vocab_size"]
    out = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, "precisions": {}}
    for precision in config.precisions:
        model = gguf_model(cache, llama, precision, config.threads)
        log(f"llamacpp-{precision}: {model}")
        figures = tool_results(llama, model, latency, throughput, config.threads, config.reps, log)
        system = LlamaCppSystem(f"llamacpp-{precision}", config.threads, model.parent, cache.checkpoint(),
                                llama_dir=config.llama_cpp)
        system.load()
        try:
            figures["parity"] = greedy_parity(system, cache.checkpoint(), prompt_ids(latency[0], vocab),
                                              config.new_tokens)
        finally:
            system.close()
        figures |= {"file_mb": model.stat().st_size / 1e6, "weight_mb_per_token": system.weight_bytes / 1e6}
        out["precisions"][precision] = figures
    return out


def markdown(results: dict) -> str:
    first = next(iter(results["precisions"].values()))
    contexts = [r["point"]["prompt"] for r in first["latency"]]
    batches = [r["point"]["batch"] for r in first["throughput"]]
    head = (["system", "file MB"] + [f"prefill {c} tok, ms" for c in contexts] + [f"ms/token at {c}" for c in contexts]
            + [f"decode tok/s, batch {b}" for b in batches] + ["greedy tokens = PyTorch's", "max abs Δlogit"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision, r in results["precisions"].items():
        parity = r["parity"]
        cells = ([f"llamacpp-{precision}", f"{r['file_mb']:.1f}"] + [cell(x, "prefill_ms") for x in r["latency"]]
                 + [cell(x, "per_token_ms", digits=2) for x in r["latency"]]
                 + [cell(x, "decode_tokens_per_s", digits=0) for x in r["throughput"]]
                 + [agreement_text(parity), f"{parity['max_abs_logit_diff']:.2e}"])
        lines.append("| " + " | ".join(cells) + " |")
    commands = [c for r in results["precisions"].values() for c in r["commands"]]
    return "\n".join(lines + ["", "Commands:", *[f"    {c}" for c in commands]])


def main(argv: list[str] | None = None) -> int:
    d = PeerConfig()
    p = argparse.ArgumentParser(prog="python -m gpt2_onnx.benchmarks.llamacpp_peer", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.source, help="checkpoint folder, hub id or random:<preset>")
    p.add_argument("--llama-cpp", type=Path, default=None, help="an existing llama.cpp build (default: build one, cached)")
    p.add_argument("--precisions", default=",".join(d.precisions), help=f"any of {', '.join(PRECISIONS)}")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--reps", type=int, default=d.reps, help="llama-bench repetitions and llama-batched-bench runs")
    p.add_argument("--contexts", default="32", help="prompt lengths (comma-separated)")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--cache", type=Path, default=None, help="export cache (default: $GPT2_ONNX_CACHE or ~/.cache/gpt2-onnx/bench)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    config = PeerConfig(args.model, args.llama_cpp, tuple(args.precisions.split(",")), args.threads, args.reps,
                        tuple(map(int, args.contexts.split(","))), args.new_tokens,
                        tuple(map(int, args.batches.split(","))), args.cache)
    try:
        results = run_peer(config, log=lambda line: print(line, file=sys.stderr))
    except Gpt2OnnxError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
