"""`gpt2-onnx VERB ...`: export, quality, verify, generate, serve, bench, attention.

Each verb is an `add_<verb>(subparsers)` + `run_<verb>(args)` pair. Building the parser imports only the
run-time engine's declarations, so every verb's --help (and generate, serve, verify) works on a
run-time-only install. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from gpt2_onnx.engine.config import GenerationConfig, user_options
from gpt2_onnx.engine.manifest import GRAPHS, INT8_KERNELS, KV_CACHES, PRECISIONS
from gpt2_onnx.engine.session import PROVIDERS
from gpt2_onnx.errors import Gpt2OnnxError
from gpt2_onnx.serve.config import ServerConfig  # fastapi-free: --help works on any install

KV_PAGE_CHOICES = {"auto": None, "on": True, "off": False}


class Help(argparse.HelpFormatter):
    """Shows each default once: appended unless the help already says it, never for None or False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, [], argparse.SUPPRESS) \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=Help)


@contextmanager
def needs_extra(extras: str, what: str) -> Iterator[None]:
    """An import that fails inside becomes one line naming the extra to install."""
    try:
        yield
    except ImportError as exc:
        raise Gpt2OnnxError(f"{what} needs the `{extras}` extra ({exc.name} is missing): "
                            f"pip install 'gpt2-onnx[{extras}]'") from None


def positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_export(sub) -> None:
    p = _parser(sub, "export", "export a GPT-2 checkpoint to an ONNX folder")
    p.add_argument("source", help="hub id (gpt2, distilgpt2, ...), a local checkpoint folder, or random:<preset>")
    p.add_argument("out_dir", help="folder to write (refused if it exists and is not empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds a previous export")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp16 is meant for --provider cuda (on CPU it runs, slower than fp32)")
    p.add_argument("--graph", choices=GRAPHS, default="fast",
                   help="fast: the engine's fused graph; reference: Optimum's plain export (fp32)")
    q = p.add_argument_group("quantization")
    # export.quantize.BLOCK_SIZES, written out: --help must work without the export extra (a test keeps them equal)
    q.add_argument("--block-size", type=int, default=None, choices=[16, 32, 64, 128, 256],
                   help="weights per scale along K (int4 blocks, 8-bit head) (default: the largest of 256 (int4), "
                        "128, 64, 32 that divides the width)")
    q.add_argument("--asymmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="store a zero point per block (default: symmetric, which measured as accurate and faster)")
    q.add_argument("--lm-head-bits", type=int, choices=[4, 8, 32], default=None,
                   help="bits of the tied embedding / LM head (default: 8 for int8 and int4)")
    q.add_argument("--head-shortlist", type=int, default=None, metavar="N",
                   help="8-bit LM head: score every token with a 4-bit copy first and re-score the best N from the "
                        "8 bits (greedy picks the 8-bit argmax whenever it is among them) (default: 32); 0: the plain 8-bit head")
    q.add_argument("--int8-kernel", choices=INT8_KERNELS, default=None,
                   help="int8 blocks: DynamicQuantizeMatMul (per-channel weights, one activation scale per matrix) or "
                        "MatMulNBits (8-bit blocks; faster one token at a time on VNNI CPUs, and then comes with the "
                        "batched graph) (default: MatMulNBits where the exporting CPU has AVX-512 VNNI or AVX-VNNI, "
                        "so export on the CPU class that will serve)")
    q.add_argument("--batched-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="int4: also write an int8 graph for prompts and wide batches, used from the token count "
                        "at which it measured faster (costs the int8 weights' size on disk and in memory)")
    q.add_argument("--kv-cache", choices=KV_CACHES, default="float32",
                   help="int8: the KV cache in int8 with per-channel scales calibrated on the shipped prose, a quarter "
                        "of its memory and of what wide decode steps read (faster batches and long contexts; prompts "
                        "~2x slower in attention, see README) (default: float32)")
    q.add_argument("--eval-text", default=None,
                   help="text file for the quality measurement (default: the prose shipped with gpt2-onnx)")
    q.add_argument("--skip-quality", action="store_true", help="do not measure quality against PyTorch")
    p.add_argument("--with-attention", action="store_true",
                   help="also write attention.onnx, the inspection graph `gpt2-onnx attention` draws from")


def quant_config(args):
    from gpt2_onnx.export import QuantConfig

    if args.precision == "int4":
        defaults = QuantConfig.int4(block_size=args.block_size)
    elif args.precision == "int8":
        defaults = QuantConfig.int8(block_size=args.block_size, kernel=args.int8_kernel)
    else:
        return QuantConfig(args.precision, kv_cache=args.kv_cache)
    symmetric = defaults.symmetric if args.asymmetric is None else not args.asymmetric
    return QuantConfig(args.precision, block_size=args.block_size, symmetric=symmetric,
                       lm_head_bits=args.lm_head_bits or defaults.lm_head_bits, batched_graph=args.batched_graph,
                       int8_kernel=defaults.int8_kernel,
                       head_shortlist=defaults.head_shortlist if args.head_shortlist is None else args.head_shortlist,
                       kv_cache=args.kv_cache)


def run_export(args) -> None:
    from gpt2_onnx.export import export_model

    export_model(args.source, args.out_dir, quant=quant_config(args), graph=args.graph, force=args.force,
                 eval_text=args.eval_text, eval_windows=0 if args.skip_quality else None,
                 with_attention=args.with_attention)


def add_quality(sub) -> None:
    p = _parser(sub, "quality", "measure an export against its fp32 PyTorch source, teacher-forced")
    p.add_argument("model_dir")
    p.add_argument("--text", default=None, help="text file (default: the prose shipped with gpt2-onnx)")
    p.add_argument("--threads", type=positive(int), default=None, help="intra-op threads (default: all CPUs)")


def run_quality(args) -> None:
    import json

    from gpt2_onnx.engine import Engine
    from gpt2_onnx.export.load import load_checkpoint
    from gpt2_onnx.export.quality import evaluation_windows, measure_quality

    engine = Engine(args.model_dir, threads=args.threads)
    if not engine.manifest.source:
        raise Gpt2OnnxError(f"{args.model_dir} has no gpt2_onnx.json naming its source; export it with gpt2-onnx")
    checkpoint = load_checkpoint(engine.manifest.source)
    windows, described = evaluation_windows(checkpoint.tokenizer, checkpoint.model, args.text)
    print(json.dumps({"text": described, **measure_quality(checkpoint.model, engine, windows)}, indent=2))


def add_verify(sub) -> None:
    p = _parser(sub, "verify", "check every file of an export against the sha256 in its manifest")
    p.add_argument("model_dir")


def run_verify(args) -> int:
    from pathlib import Path

    from gpt2_onnx.engine.manifest import Manifest

    folder = Path(args.model_dir)
    problems = Manifest.read(folder).verify(folder)
    for problem in problems:
        print(f"gpt2-onnx verify: {problem}", file=sys.stderr)
    if not problems:
        print(f"{folder}: every file matches its manifest")
    return 1 if problems else 0


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The flags come from GenerationConfig's own declarations (engine/config.py)."""
    g = p.add_argument_group("generation (setting --temperature, --top-k or --top-p turns sampling on)")
    defaults = GenerationConfig()
    for option in user_options():
        meta, default = option.metadata, getattr(defaults, option.name)
        shown = f" (default: {', '.join(default) or 'none'})" if option.name == "stop" else \
            ("" if default is None else f" (default: {default}{'; greedy' if option.name == 'temperature' else ''})")
        g.add_argument(f"--{option.name.replace('_', '-')}", type=meta["kind"], default=None,
                       action="append" if option.name == "stop" else "store", help=meta["help"] + shown)
    add_runtime_options(p)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("runtime")
    r.add_argument("--provider", choices=list(PROVIDERS), default="cpu")
    r.add_argument("--threads", type=positive(int), default=None, help="intra-op threads (default: all CPUs)")


def generation_config(args) -> GenerationConfig:
    return GenerationConfig.from_options(**{o.name: getattr(args, o.name) for o in user_options()})


def add_generate(sub) -> None:
    p = _parser(sub, "generate", "continue a prompt, printing tokens as they come")
    p.add_argument("model_dir", help="a folder written by `gpt2-onnx export`")
    p.add_argument("prompt")
    add_generation_options(p)


def run_generate(args) -> None:
    from gpt2_onnx.engine import Engine

    config = generation_config(args)
    if config.max_new_tokens < 1:
        raise Gpt2OnnxError("--max-new-tokens must be >= 1")
    engine = Engine(args.model_dir, provider=args.provider, threads=args.threads)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in engine.stream(args.prompt, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def add_serve(sub) -> None:
    d = ServerConfig()
    p = _parser(sub, "serve", "an OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("model_dir", help="a folder written by `gpt2-onnx export` (the default fast graph)")
    p.add_argument("--host", default=d.host, help="interface to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-batch", type=positive(int), default=d.max_batch, help="requests decoded together")
    p.add_argument("--max-queue", type=positive(int), default=d.max_queue,
                   help="rows waiting for a slot; a request that would pass it gets HTTP 429")
    p.add_argument("--max-body", type=positive(int), default=d.max_body_bytes, help="largest request body, bytes")
    p.add_argument("--max-rows-per-request", type=positive(int), default=d.max_rows_per_request, help="prompts x n in one request")
    p.add_argument("--request-timeout", type=positive(float), default=d.request_timeout_s, help="seconds before a request is ended")
    p.add_argument("--api-key", default=os.environ.get("GPT2_ONNX_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $GPT2_ONNX_API_KEY, else no key)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 before serving")
    p.add_argument("--kv-huge-pages", choices=KV_PAGE_CHOICES, default="auto",
                   help="the KV buffer (max batch x the model's context) on 2 MB pages: ~10%% faster attention, "
                        "but a row in use commits its full length; auto: if the whole buffer is under 1/4 of memory")
    add_runtime_options(p)
    r = p.add_argument_group("Ray Serve (more than one process or machine; needs the `ray` extra)")
    r.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas, each with --threads CPUs (default 1)")
    r.add_argument("--replicas", type=positive(int), default=1, help="replicas (with --ray)")
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="let Ray scale the replicas (with --ray)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this cluster (`ray start --head` prints it); default: start a local Ray")


def run_serve(args) -> None:
    from pathlib import Path

    with needs_extra("serve", "serving"):
        from gpt2_onnx.serve.app import serve
    if args.verify:
        from gpt2_onnx.engine.manifest import Manifest

        folder = Path(args.model_dir)
        if problems := Manifest.read(folder).verify(folder):
            raise Gpt2OnnxError(f"{len(problems)} file(s) fail verification, e.g. {problems[0]}; re-export the model")
    config = ServerConfig(args.host, args.port, args.max_batch, args.max_queue, args.api_key, args.model_name,
                          max_body_bytes=args.max_body, max_rows_per_request=args.max_rows_per_request,
                          request_timeout_s=args.request_timeout, kv_huge_pages=KV_PAGE_CHOICES[args.kv_huge_pages])
    if not args.ray:
        if args.replicas != 1 or args.autoscale or args.ray_address:
            raise Gpt2OnnxError("--replicas, --autoscale and --ray-address need --ray")
        check_port_free(args.host, args.port)
        return serve(args.model_dir, config, provider=args.provider, threads=args.threads)
    from gpt2_onnx.serve.ray_run import RayRun, serve_on_ray

    if args.autoscale and args.replicas != 1:
        raise Gpt2OnnxError("give --replicas N or --autoscale MIN:MAX, not both")
    if not args.ray_address:
        check_port_free(args.host, args.port)
    serve_on_ray(RayRun(args.model_dir, config, args.threads or 1, args.replicas, args.autoscale, args.ray_address,
                        args.provider))


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise Gpt2OnnxError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or "
                                "stop what uses it") from None


def add_bench(sub) -> None:
    from gpt2_onnx.benchmarks import ALL_SYSTEMS

    p = _parser(sub, "bench", "latency, throughput, memory and parity against PyTorch and peers, one run")
    p.add_argument("--model", default="random:gpt2", help="hub id, local checkpoint folder, or random:<preset>")
    p.add_argument("--quick", action="store_true", help="fewer points and rounds: a smoke run")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md and the plots")
    p.add_argument("--threads", type=positive(int), default=2,
                   help="threads for every system (pinned, stated in the report)")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated, from {','.join(ALL_SYSTEMS)} (default: all; --quick: all but optimum-fp32)")
    p.add_argument("--reps", type=positive(int), default=None, help="alternating rounds (default: 5; quick: 2)")
    p.add_argument("--check", action="append", default=[], metavar="EXPR",
                   help="gate, e.g. 'per_token:engine-int8/per_token:optimum-int8<=0.25'; exit 1 if one fails")
    p.add_argument("--eval-text", default=None, help="text for the quantized parity (default: the shipped prose)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process memory and cold-start probes")
    p.add_argument("--no-serving", action="store_true", help="skip the HTTP server under load")
    p.add_argument("--no-kernel-floors", action="store_true",
                   help="skip timing the engine's weight products alone and its graph's fixed step cost")
    p.add_argument("--cache", default=None, help="export cache (default: $GPT2_ONNX_CACHE or ~/.cache/gpt2-onnx/bench)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="an existing llama.cpp build for the llamacpp-* systems (default: build llama.cpp's tools once "
                        "from the llama-cpp-python source distribution, cached in ~/.cache/gpt2-onnx/llama.cpp)")
    p.add_argument("--no-llama-tools", action="store_true",
                   help="skip llama-bench / llama-batched-bench (llama.cpp is still timed by the suite)")


def run_bench(args) -> int:
    from pathlib import Path

    from gpt2_onnx.benchmarks import ALL_SYSTEMS

    with needs_extra("export,bench", "benchmarking"):
        from gpt2_onnx.benchmarks.report import evaluate
        from gpt2_onnx.benchmarks.suite import BenchConfig, Suite, failed_checks
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
                         serving=not args.no_serving, kernel_floors=not args.no_kernel_floors,
                         cache=Path(args.cache) if args.cache else None,
                         llama_cpp=Path(args.llama_cpp) if args.llama_cpp else None, llama_tools=not args.no_llama_tools,
                         command=" ".join(["gpt2-onnx bench", *sys.argv[2:]]))
    results = Suite(config).run()
    print((Path(args.out) / "results.md").read_text())
    failed = failed_checks(results)
    for check in failed:
        print(f"check failed: {check['check']} = {check['value']} (wanted {check['op']} {check['bound']:g})",
              file=sys.stderr)
    return 1 if failed else 0


def add_attention(sub) -> None:
    p = _parser(sub, "attention", "draw what each token attends to, per layer and head (an export --with-attention)")
    p.add_argument("model_dir", help="a folder written by `gpt2-onnx export ... --with-attention`")
    p.add_argument("prompt")
    p.add_argument("--layer", type=int, default=None, help="one layer (default: every layer, a grid)")
    p.add_argument("--head", type=int, default=None, help="one head (default: every head, a grid)")
    p.add_argument("--out", default="attention.png", help="image to write (.png, .svg, .pdf)")


def run_attention(args) -> None:
    from gpt2_onnx.engine import Engine
    from gpt2_onnx.plot_attention import plot_attention

    maps = Engine(args.model_dir, threads=None).attention(args.prompt)
    path = plot_attention(maps, args.out, layer=args.layer, head=args.head)
    print(f"wrote {path} ({len(maps.token_ids)} tokens, {maps.shape[0]} layers x {maps.shape[1]} heads)")


VERBS = {"export": (add_export, run_export), "quality": (add_quality, run_quality),
         "verify": (add_verify, run_verify), "generate": (add_generate, run_generate),
         "serve": (add_serve, run_serve), "bench": (add_bench, run_bench),
         "attention": (add_attention, run_attention)}
NEEDS_EXPORT = {"export", "quality"}


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
    except ModuleNotFoundError as exc:
        if args.verb not in NEEDS_EXPORT:
            raise
        print(f"gpt2-onnx {args.verb}: error: this verb needs the `export` extra ({exc.name} is missing): "
              "pip install 'gpt2-onnx[export]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2-onnx {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt2-onnx generate ... | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
