"""What onnxruntime's kernels allow a one-row decode step, measured in the suite's own run.

    python -m gpt2_onnx.benchmarks.kernel_floor MODEL_DIR [MODEL_DIR ...] [--threads 2] [--rounds 5] [--runs 100]

The weight floor (`floor:SYSTEM`: the weights a step reads / the probe's bandwidth) is a step that did nothing
but stream its weights. Two measurements say where onnxruntime's kernels themselves stop:
- products: every weight product a one-row step runs (the layers' blocks and the LM head's product: the same
  ops, attributes and weights, cut out of the export), each fed one row, in one session with the engine's
  options and the weights on 2 MB pages: what the kernels take to stream these weights;
- overhead: the export's narrow twin, same layers, heads, vocabulary and recipe but heads of 8 (gpt2: n_embd
  96), whose step keeps every node of the real graph: its step time less its own products is what dispatch,
  threading, attention and the small ops cost a step.
Their sum, `kernel_floor:SYSTEM`, is the step this graph could reach with these kernels. The engine's own
one-row step is timed in the same alternating rounds (`step:SYSTEM`): step / kernel_floor is what is left
above the kernels, both measured within seconds of each other on a machine whose speed drifts by minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

WEIGHT_PRODUCTS = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMul", "Gemm")
HEAD_WIDTH = 8  # the narrow twin's head size
BLOCK = 32  # its width must be a multiple of the smallest quantization block
PROMPT = 32  # positions before the timed decode steps
WARMUP = 5  # untimed calls before each round's timed ones


def one_row_products(model):
    """The weight products of `model` (an onnx.ModelProto) a one-row step runs, as a graph of their own: each
    product reads input `x{K}` ([1, K], K its input width) and writes its own output. Of an If it takes the
    then-branch, the shortlisted head's few-rows path (export/lm_head.py)."""
    from onnx import TensorProto, helper

    initializers = {t.name: t for t in model.graph.initializer}
    nodes, widths, used = [], set(), set()

    def walk(graph) -> None:
        for node in graph.node:
            if node.op_type == "If":
                walk(next(a.g for a in node.attribute if a.name == "then_branch"))
            weights = [name for name in node.input[1:] if name]
            if node.op_type not in WEIGHT_PRODUCTS or not weights or not set(weights) <= initializers.keys():
                continue  # activations only (attention's products, the shortlist's re-scoring)
            width = _input_width(node, initializers[node.input[1]])
            product = helper.make_node(node.op_type, [f"x{width}", *node.input[1:]], [f"y{len(nodes)}"],
                                       name=f"product{len(nodes)}", domain=node.domain)
            product.attribute.extend(node.attribute)
            nodes.append(product)
            widths.add(width)
            used.update(weights)
    walk(model.graph)
    if not nodes:
        raise ValueError("the graph has no weight products to time")
    graph = helper.make_graph(
        nodes, "one_row_products",
        [helper.make_tensor_value_info(f"x{w}", TensorProto.FLOAT, [1, w]) for w in sorted(widths)],
        [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes],
        [initializers[name] for name in sorted(used)])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _input_width(node, weight) -> int:
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "K")
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return int(weight.dims[1] if transposed else weight.dims[0])


def products_timer(model_dir: Path, threads: int) -> Callable[[], None]:
    """One pass over the export's one-row weight products, as the engine would run them."""
    import onnx
    import onnxruntime as ort

    from gpt2_onnx.engine.hugepages import collapse_populated_memory, huge_pages_wanted
    from gpt2_onnx.engine.manifest import MODEL_FILE
    from gpt2_onnx.engine.session import session_options

    products = one_row_products(onnx.load(str(Path(model_dir) / MODEL_FILE)))
    with tempfile.TemporaryDirectory() as tmp:  # external data: a product graph may pass protobuf's 2 GB
        path = Path(tmp) / "products.onnx"
        onnx.save_model(products, str(path), save_as_external_data=True, location="products.data")
        del products
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    if huge_pages_wanted(None):  # as the engine places its weights
        collapse_populated_memory()
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    return lambda: session.run(None, feeds)


def step_timer(model_dir: Path, threads: int, steps: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(start, step): a one-row decode step of the engine on `model_dir`, and a start that sets its row back to
    a 32-token prompt, so every round times `steps` steps at the same contexts (as the suite's per-token figure:
    32 positions on)."""
    from gpt2_onnx.engine import Engine

    decoder = Engine(model_dir, threads=threads).batched_from(None).new_decoder()
    decoder.allocate(1, PROMPT + steps)
    tokens = np.zeros(1, np.int64)

    def start() -> None:
        if decoder.rows:
            decoder.remove(0)
        decoder.add(list(range(PROMPT)))
    return start, lambda: decoder.decode(tokens)


def narrow_shape(config: dict) -> dict:
    """The narrow twin of a GPT-2 config: same layers, heads, vocabulary and context, heads of HEAD_WIDTH (wider
    where the heads times HEAD_WIDTH is no multiple of BLOCK)."""
    heads = config.get("n_head", 12)
    width = heads * HEAD_WIDTH
    width = math.lcm(width, BLOCK) if width % BLOCK else width
    return dict(n_layer=config.get("n_layer", 12), n_head=heads, n_embd=width,
                vocab_size=config.get("vocab_size", 50257), n_positions=config.get("n_positions", 1024))


def kernel_floors(folders: dict[str, Path], config: dict, threads: int, rounds: int = 5,
                  runs: int = 100) -> dict[str, dict]:
    """{system: {step_ms, products_ms, overhead_ms, kernel_floor_ms}, each median (min-max) over `rounds`
    alternating rounds of `runs` calls} for engine systems named engine-PRECISION; step_ms is the engine's own
    one-row step in the same rounds, so it and the floor share the machine's moment. The narrow twins use each
    precision's default recipe without the batched graph, which one-row steps never run."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_onnx.export import QuantConfig, export_model
    from gpt2_onnx.export.load import gpt2_tokenizer

    from .measure import SETTLE_S, median_ms, spread

    timers: dict[tuple[str, str], tuple[Callable[[], None], Callable[[], None]]] = {}  # (start, call)
    with tempfile.TemporaryDirectory() as tmp:  # every session holds its weights once built
        checkpoint = Path(tmp) / "narrow"
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**narrow_shape(config))).save_pretrained(checkpoint)
        gpt2_tokenizer().save_pretrained(checkpoint)
        for name, folder in folders.items():
            quant = replace(getattr(QuantConfig, name.removeprefix("engine-"))(), batched_graph=False)
            narrow = export_model(str(checkpoint), Path(tmp) / name, quant=quant, eval_windows=0,
                                  log=lambda _: None).out_dir
            timers[name, "step"] = step_timer(folder, threads, runs + WARMUP)  # the engine's own, same rounds
            timers[name, "products"] = (lambda: None, products_timer(folder, threads))
            timers[name, "narrow_step"] = step_timer(narrow, threads, runs + WARMUP)
            timers[name, "narrow_products"] = (lambda: None, products_timer(narrow, threads))
    times: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
    for round_ in range(rounds):  # alternating, as the suite times the systems themselves
        for key in list(timers) if round_ % 2 == 0 else list(timers)[::-1]:
            start, call = timers[key]
            start()
            time.sleep(SETTLE_S)  # the previous session's pool stops spinning
            times[key].append(median_ms(call, runs, WARMUP))
    floors = {}
    for name in folders:
        products = np.array(times[name, "products"])
        overhead = np.maximum(0.0, np.array(times[name, "narrow_step"]) - np.array(times[name, "narrow_products"]))
        floors[name] = {"step_ms": spread(np.array(times[name, "step"])), "products_ms": spread(products),
                        "overhead_ms": spread(overhead), "kernel_floor_ms": spread(products + overhead)}
    return floors


def main() -> None:
    from gpt2_onnx.engine.manifest import Manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dirs", type=Path, nargs="+", help="engine exports of one checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=100, help="calls per round (median)")
    args = parser.parse_args()
    manifests = [Manifest.read(folder) for folder in args.model_dirs]
    config = json.loads((args.model_dirs[0] / "config.json").read_text())
    folders = {f"engine-{m.precision}": folder for m, folder in zip(manifests, args.model_dirs)}
    for name, floor in kernel_floors(folders, config, args.threads, args.rounds, args.runs).items():
        print(json.dumps({"system": name, "folder": str(folders[name]), "threads": args.threads, **floor}))


if __name__ == "__main__":
    main()
