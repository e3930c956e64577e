"""`gpt2-onnx VERB ...`: export, generate, quality, serve, bench.

Each verb is a `add_<verb>(subparsers)` + `run_<verb>(args)` pair; errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt2_onnx.errors import Gpt2OnnxError


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a GPT-2 checkpoint to an ONNX folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="hub id (gpt2, distilgpt2, ...), a local checkpoint folder, or random:<preset>")
    p.add_argument("out_dir", help="folder to write (refused if it exists and is not empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--precision", choices=["fp32", "int8", "int4", "fp16"], default="fp32",
                   help="fp16 is meant for --provider cuda (on CPU it runs, slower than fp32)")
    p.add_argument("--graph", choices=["fast", "reference"], default="fast",
                   help="fast: the engine's fused graph; reference: Optimum's plain export (fp32)")
    q = p.add_argument_group("quantization")
    q.add_argument("--block-size", type=int, default=32, help="int4: weights per scale along K")
    q.add_argument("--asymmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="store a zero point per block (default: symmetric, which measured as accurate and faster)")
    q.add_argument("--lm-head-bits", type=int, choices=[4, 8, 32], default=None,
                   help="bits of the tied embedding / LM head (default: 8 for int4, 8 for int8)")
    q.add_argument("--eval-text", default=None,
                   help="text file for the quality measurement (default: text sampled from the fp32 model)")
    q.add_argument("--skip-quality", action="store_true",
                   help="do not measure quality against PyTorch (minutes for gpt2 on 2 cores); the manifest then has none")


def quant_config(args):
    from gpt2_onnx.export import QuantConfig

    if args.precision == "int4":
        defaults = QuantConfig.int4(block_size=args.block_size)
    elif args.precision == "int8":
        defaults = QuantConfig.int8(block_size=args.block_size)
    else:
        return QuantConfig.fp16() if args.precision == "fp16" else QuantConfig.fp32()
    symmetric = defaults.symmetric if args.asymmetric is None else not args.asymmetric
    return QuantConfig(args.precision, block_size=args.block_size, symmetric=symmetric,
                       lm_head_bits=args.lm_head_bits or defaults.lm_head_bits)


def run_export(args) -> None:
    from gpt2_onnx.export import export_model

    export_model(args.source, args.out_dir, quant=quant_config(args), graph=args.graph, force=args.force,
                 eval_text=args.eval_text, eval_windows=0 if args.skip_quality else 160)


def add_quality(sub) -> None:
    p = sub.add_parser("quality", help="measure an export against its fp32 PyTorch source, teacher-forced",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--text", default=None, help="text file (default: text sampled from the fp32 model)")
    p.add_argument("--threads", type=int, default=None)


def run_quality(args) -> None:
    import json

    from gpt2_onnx.engine import Engine
    from gpt2_onnx.export.load import load_checkpoint
    from gpt2_onnx.export.quality import evaluation_windows, measure_quality

    engine = Engine(args.model_dir, threads=args.threads)
    if not engine.info.source:
        raise Gpt2OnnxError(f"{args.model_dir} has no gpt2_onnx.json naming its source; export it with gpt2-onnx")
    checkpoint = load_checkpoint(engine.info.source)
    windows, described = evaluation_windows(checkpoint.tokenizer, checkpoint.model, args.text)
    print(json.dumps({"text": described, **measure_quality(checkpoint.model, engine, windows)}, indent=2))


def add_generation_options(p: argparse.ArgumentParser) -> None:
    from gpt2_onnx.engine import GenerationConfig

    d = GenerationConfig()
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens)
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; setting it (> 0) turns sampling on (default: greedy)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=d.top_p, help="1.0 = off")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    r = p.add_argument_group("runtime")
    r.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all CPUs)")


def generation_config(args):
    from gpt2_onnx.engine import GenerationConfig

    sampling = (args.temperature is not None and args.temperature > 0) or args.top_k > 0 or args.top_p < 1.0
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=sampling,
        temperature=args.temperature if args.temperature is not None else 1.0, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), seed=args.seed)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, printing tokens as they come",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a folder written by `gpt2-onnx export`")
    p.add_argument("prompt")
    add_generation_options(p)


def run_generate(args) -> None:
    from gpt2_onnx.engine import Engine

    engine = Engine(args.model_dir, provider=args.provider, threads=args.threads)
    config = generation_config(args)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in engine.stream(args.prompt, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a folder written by `gpt2-onnx export` (the default fast graph)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond that; more get HTTP 429")
    p.add_argument("--api-key", default=os.environ.get("GPT2_ONNX_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $GPT2_ONNX_API_KEY, else no key)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all CPUs)")


def run_serve(args) -> None:
    from gpt2_onnx.engine.server import ServerConfig, serve

    if args.max_batch < 1 or args.max_queue < 0:
        raise Gpt2OnnxError("--max-batch must be >= 1 and --max-queue >= 0")
    serve(args.model_dir, ServerConfig(args.host, args.port, args.max_batch, args.max_queue, args.api_key,
                                       args.model_name), provider=args.provider, threads=args.threads)


def add_bench(sub) -> None:
    from gpt2_onnx.benchmarks.suite import ALL_SYSTEMS

    p = sub.add_parser("bench", help="latency, throughput, memory and parity against PyTorch and peers, one run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="random:gpt2", help="hub id, local checkpoint folder, or random:<preset>")
    p.add_argument("--quick", action="store_true", help="fewer points and rounds: a smoke run")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md and the plots")
    p.add_argument("--threads", type=int, default=2, help="threads for every system (pinned, stated in the report)")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated, from {','.join(ALL_SYSTEMS)} (default: all; --quick: all but optimum-fp32)")
    p.add_argument("--reps", type=int, default=None, help="alternating rounds (default 5, quick 2)")
    p.add_argument("--check", action="append", default=[], metavar="EXPR",
                   help="gate, e.g. 'per_token:engine-int8/per_token:optimum-int8<=0.25'; exit 1 if one fails")
    p.add_argument("--eval-text", default=None, help="text for the quantized parity (default: sampled from fp32)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process memory and cold-start probes")
    p.add_argument("--cache", default=None, help="export cache (default: $GPT2_ONNX_CACHE or ~/.cache/gpt2-onnx/bench)")


def run_bench(args) -> int:
    from pathlib import Path

    from gpt2_onnx.benchmarks.report import evaluate
    from gpt2_onnx.benchmarks.suite import ALL_SYSTEMS, BenchConfig, Suite, failed_checks

    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip()) if args.systems else None
    unknown = [s for s in systems or () if s not in ALL_SYSTEMS]
    if unknown:
        raise Gpt2OnnxError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(ALL_SYSTEMS)}")
    for check in args.check:
        try:
            evaluate({}, check)
        except ValueError as exc:
            raise Gpt2OnnxError(str(exc)) from None
    config = BenchConfig(source=args.model, out=Path(args.out), quick=args.quick, threads=args.threads,
                         systems=systems, reps=args.reps, checks=tuple(args.check),
                         eval_text=Path(args.eval_text) if args.eval_text else None, memory=not args.no_memory,
                         cache=Path(args.cache) if args.cache else None,
                         command=" ".join(["gpt2-onnx bench", *sys.argv[2:]]))
    results = Suite(config).run()
    print((Path(args.out) / "results.md").read_text())
    failed = failed_checks(results)
    for check in failed:
        print(f"check failed: {check['check']} = {check['value']} (wanted {check['op']} {check['bound']:g})",
              file=sys.stderr)
    return 1 if failed else 0


VERBS = {"export": (add_export, run_export), "generate": (add_generate, run_generate),
         "quality": (add_quality, run_quality), "serve": (add_serve, run_serve),
         "bench": (add_bench, run_bench)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpt2-onnx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for add, _ in VERBS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        code = VERBS[args.verb][1](args)
    except Gpt2OnnxError as exc:
        print(f"gpt2-onnx {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2-onnx {args.verb}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
