"""What onnxruntime's kernels allow a decode step and a prompt, measured in the suite's own run.

    python -m gpt2_onnx.benchmarks.kernel_floor MODEL_DIR [MODEL_DIR ...] [--threads 2] [--rounds 5] [--runs 100]

The weight floor (`floor:SYSTEM`: the weights a step reads / the probe's bandwidth) is a step that did nothing
but stream its weights. Two measurements say where onnxruntime's kernels themselves stop:
- products: every weight product the pass runs (the layers' blocks and the LM head's product: the same ops,
  attributes and weights, cut out of the export), each fed its rows, in one session with the engine's options
  and the weights on 2 MB pages: what the kernels take to stream these weights;
- overhead: the same export with every weight product replaced by a stand-in (a mean of its input plus its
  bias, the product's output shape), run by the engine's decoder on the same KV buffer and positions, less the
  stand-ins' own time: what dispatch, threading, attention over the real cache, the LayerNorms and the head's
  top-k and re-scoring cost the pass. Both are timed cold, each call after a read of a buffer twice the
  last-level cache: in a real pass the products' weights have evicted the cache, the layer norms and the KV
  cache before the rest reads them (gpt2, 6 alternating rounds: fp32's fixed cost 0.29 ms warm against 0.63
  cold, int4's 0.39 against 0.67). The engine's own step and the products are not: their weights evict the
  cache by themselves.
Their sum, `kernel_floor:SYSTEM`, is the step this graph could reach with these kernels. The engine's own
one-row step is timed in the same alternating rounds (`step:SYSTEM`): step / kernel_floor is what is left
above the kernels, both measured within seconds of each other on a machine whose speed drifts by minutes.
The same three for a 32-token prompt, on the graph the engine runs it with (`prompt`, `prompt_products`,
`prompt_overhead`, `prompt_kernel_floor`): the prompt's blocks run 32 rows, its LM head one.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

WEIGHT_PRODUCTS = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMul", "Gemm")
BIAS_INPUT = {"MatMulNBits": 5, "DynamicQuantizeMatMul": 4, "Gemm": 2}
PROMPT = 32  # tokens of the timed prompt, and positions before the timed decode steps
WARMUP = 5  # untimed calls before each round's timed ones
COLD_PARTS = ("hollow", "stand_ins")  # timed after emptying the caches (a real pass's products empty them)
EVICTION_BYTES = 64 * 2**20  # at least; twice the last-level cache where sysfs tells it

Timer = tuple[Callable[[], None], Callable[[], None], int]  # (start, call, timed calls per round)


def is_product(node, initializers: dict) -> bool:
    """A product of activations by stored weights (attention's products and the shortlist's re-scoring multiply
    two activations: not these)."""
    weights = [name for name in node.input[1:] if name]
    return node.op_type in WEIGHT_PRODUCTS and bool(weights) and set(weights) <= initializers.keys()


def weight_products(graph, initializers: dict) -> Iterator:
    """Every weight product in `graph` and in the then-branches of its If nodes (the shortlisted head's few-rows
    path, export/lm_head.py), in order."""
    for node in graph.node:
        if node.op_type == "If":
            yield from weight_products(next(a.g for a in node.attribute if a.name == "then_branch"), initializers)
        if is_product(node, initializers):
            yield node


def _widths(node, initializers: dict) -> tuple[int, int]:
    """(K, N) of a product: its input and output widths."""
    if node.op_type == "MatMulNBits":
        attributes = {a.name: a.i for a in node.attribute}
        return attributes["K"], attributes["N"]
    weight = initializers[node.input[1]]
    transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return (int(weight.dims[1]), int(weight.dims[0])) if transposed else (int(weight.dims[0]), int(weight.dims[1]))


def _element_type(node, initializers: dict) -> int:
    """The onnx element type of a product's input and output: its scales' for MatMulNBits (fp16 graphs keep
    fp16 scales), its weight's for MatMul and Gemm; DynamicQuantizeMatMul reads and writes fp32."""
    from onnx import TensorProto

    if node.op_type == "DynamicQuantizeMatMul":
        return TensorProto.FLOAT
    return initializers[node.input[2 if node.op_type == "MatMulNBits" else 1]].data_type


def _stand_in(node, initializers: dict, offsets: dict) -> list:
    """Two cheap nodes that write the product's output shape from its input: mean(x) + its bias (zeros if none);
    the [N] offset goes into `offsets` (name -> array)."""
    from onnx import helper, numpy_helper

    _, n = _widths(node, initializers)
    index = BIAS_INPUT.get(node.op_type)
    bias = node.input[index] if index is not None and len(node.input) > index else ""
    offset = f"{node.name}/stand_in_offset"
    dtype = helper.tensor_dtype_to_np_dtype(_element_type(node, initializers))
    offsets[offset] = numpy_helper.to_array(initializers[bias]).reshape(-1) if bias else np.zeros(n, dtype)
    mean = f"{node.name}/stand_in_mean"
    return [helper.make_node("ReduceMean", [node.input[0]], [mean], name=mean, axes=[-1], keepdims=1),
            helper.make_node("Add", [mean, offset], [node.output[0]], name=f"{node.name}/stand_in")]


def products_graph(model, stand_ins: bool = False):
    """The weight products of `model` (an onnx.ModelProto) as a graph of their own, each writing its own output
    and reading input `x{K}` ([rows, K], any number of rows) or, for the LM head's product, `head{K}` ([1, K]:
    a step or a prompt runs the head at its last position only); with `stand_ins`, each product's stand-in
    instead (what `hollow` puts in their place)."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    vocab = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    nodes, outputs, inputs, used, offsets = [], [], {}, set(), {}
    for node in weight_products(model.graph, initializers):
        k, n = _widths(node, initializers)
        x = f"head{k}" if n == vocab else f"x{k}"
        inputs[x] = (_element_type(node, initializers), [1 if n == vocab else "rows", k])
        product = copy.deepcopy(node)
        product.input[0], product.output[0] = x, f"y{len(outputs)}"
        outputs.append((product.output[0], inputs[x][0]))
        if stand_ins:
            nodes += _stand_in(product, initializers, offsets)
        else:
            nodes.append(product)
            used.update(name for name in node.input[1:] if name)
    if not nodes:
        raise ValueError("the graph has no weight products to time")
    graph = helper.make_graph(
        nodes, "products",
        [helper.make_tensor_value_info(x, dtype, shape) for x, (dtype, shape) in sorted(inputs.items())],
        [helper.make_tensor_value_info(y, dtype, None) for y, dtype in outputs],
        [initializers[name] for name in sorted(used)] + [numpy_helper.from_array(a, n) for n, a in offsets.items()])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def hollow(model):
    """`model` with every weight product, in every branch, replaced by its stand-in, and the weights only those
    products read dropped: the pass that is left is everything but streaming the products' weights. Only the
    kept weights are copied (a gpt2-large fp32 graph holds 3 GB)."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    graph = helper.make_graph(model.graph.node, model.graph.name, model.graph.input, model.graph.output)  # copies
    offsets: dict[str, np.ndarray] = {}
    read: set[str] = set()

    def rewrite(graph) -> None:
        nodes = []
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.g.node:  # an If's branches
                    rewrite(attribute.g)
            swapped = _stand_in(node, initializers, offsets) if is_product(node, initializers) else [copy.deepcopy(node)]
            read.update(name for n in swapped for name in n.input)
            nodes += swapped
        del graph.node[:]
        graph.node.extend(nodes)
    rewrite(graph)
    graph.initializer.extend([t for name, t in initializers.items() if name in read] +
                             [numpy_helper.from_array(a, n) for n, a in offsets.items()])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def graph_sessions(path: Path, threads: int, shares_cores: bool) -> tuple:
    """(products, stand-ins, hollow graph) sessions of the export graph at `path`, with the engine's options
    (`shares_cores` as its main session: where the export has a batched graph, its pool stops spinning at the
    end of each run) and the weights on 2 MB pages as the engine's. Each graph is written out (external data:
    a products graph may pass protobuf's 2 GB) and let go before any session loads, so a gpt2-large fp32 floor
    adds one copy of its 3 GB of weights at a time."""
    import onnx
    import onnxruntime as ort

    from gpt2_onnx.engine.hugepages import collapse_populated_memory, huge_pages_wanted
    from gpt2_onnx.engine.session import session_options

    model = onnx.load(str(path))
    graphs = {"stand_ins": products_graph(model, stand_ins=True), "hollow": hollow(model)}
    graphs["products"] = products_graph(model)  # the big copy, last
    del model
    with tempfile.TemporaryDirectory() as tmp:
        for name in list(graphs):
            onnx.save_model(graphs.pop(name), str(Path(tmp) / f"{name}.onnx"), save_as_external_data=True,
                            location=f"{name}.data")
        sessions = {name: ort.InferenceSession(str(Path(tmp) / f"{name}.onnx"), session_options(threads, shares_cores),
                                               providers=["CPUExecutionProvider"])
                    for name in ("products", "stand_ins", "hollow")}
    if huge_pages_wanted(None):
        collapse_populated_memory()
    return sessions["products"], sessions["stand_ins"], sessions["hollow"]


def random_feeds(session, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs for a `products_graph` session: `rows` rows (the LM head's input one), each in
    its input's element type."""
    rng = np.random.default_rng(seed)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return {i.name: rng.standard_normal([rows if d == "rows" else d for d in i.shape]).astype(dtypes[i.type])
            for i in session.get_inputs()}


def products_timer(session, rows: int, runs: int) -> Timer:
    """One pass over a products (or stand-ins) session's products at `rows` rows (the LM head's at one)."""
    feeds = random_feeds(session, rows)
    return (lambda: None), (lambda: session.run(None, feeds)), runs


def step_timer(decoder, steps: int) -> Timer:
    """One-row decode steps on an engine decoder: every round times `steps` - WARMUP steps from the same
    32-token prompt (as the suite's per-token figure: 32 positions on)."""
    tokens = np.zeros(1, np.int64)
    decoder.allocate(1, PROMPT + steps)
    return (lambda: _fresh_prompt(decoder)), (lambda: decoder.decode(tokens)), steps - WARMUP


def prompt_timer(decoder, runs: int) -> Timer:
    """32-token prompts into an empty decoder."""
    decoder.allocate(1, PROMPT)
    return (lambda: None), (lambda: _fresh_prompt(decoder)), runs


def _fresh_prompt(decoder) -> None:
    if decoder.rows:
        decoder.remove(0)
    decoder.add(list(range(PROMPT)))


def cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache sysfs lists (the last level's size, shared or per core complex), 0 if unknown."""
    sizes = []
    for path in caches.glob("index*/size"):
        text = path.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


def cache_evictor(nbytes: int | None = None) -> Callable[[], None]:
    """A call that reads a buffer of `nbytes` (default: twice the largest cache, at least EVICTION_BYTES), so
    what a pass reads next comes from memory, as after a real pass's weight streaming. Reading, not writing:
    dirty lines would be written back during the timed call."""
    nbytes = max(EVICTION_BYTES, 2 * cache_bytes()) if nbytes is None else nbytes
    scratch = np.ones(-(-nbytes // 8), np.int64)  # 64-bit integer sums: ~2.4 ms for 64 MB, 10x a byte sum

    def evict() -> None:
        scratch.sum()
    return evict


PASSES = {"step": "", "prompt": "prompt_"}  # the passes floored, and their results' key prefix


def system_timers(engine, threads: int, runs: int) -> dict[tuple[str, str], Timer]:
    """Every timer of one loaded engine, keyed (pass, part): for a one-row step and a 32-token prompt, the
    engine's own ("engine"), its products, their stand-ins and the hollow graph, from one set of sessions per
    graph file (a prompt runs on the batched graph where the engine would run it there)."""
    from gpt2_onnx.engine.decoders import SharedBufferDecoder
    from gpt2_onnx.engine.manifest import MODEL_FILE

    folder, prompt_runs = Path(engine.model_dir), max(5, runs // 4)
    prompt_decoder = engine.new_decoder()
    batched = prompt_decoder.session_for(PROMPT) is not engine.session
    graphs = {"step": folder / MODEL_FILE}
    graphs["prompt"] = folder / engine.manifest.batched["folder"] / MODEL_FILE if batched else graphs["step"]
    shares_cores = bool(engine.manifest.batched)  # as the engine's main session
    sessions = {path: graph_sessions(path, threads, shares_cores) for path in set(graphs.values())}
    timers = {("step", "engine"): step_timer(engine.batched_from(None).new_decoder(), runs + WARMUP),
              ("prompt", "engine"): prompt_timer(prompt_decoder, prompt_runs)}
    for pass_, path in graphs.items():
        products, stand_ins, empty = sessions[path]
        rows = PROMPT if pass_ == "prompt" else 1
        timers[pass_, "products"] = products_timer(products, rows, prompt_runs if pass_ == "prompt" else runs)
        timers[pass_, "stand_ins"] = products_timer(stand_ins, rows, runs)
        decoder = SharedBufferDecoder(empty, engine.manifest, huge_pages=engine.huge_pages)
        timers[pass_, "hollow"] = prompt_timer(decoder, runs) if pass_ == "prompt" else step_timer(decoder, runs + WARMUP)
    return timers


def kernel_floors(engines: dict, threads: int, rounds: int = 5, runs: int = 100) -> dict[str, dict]:
    """{system: {step_ms, products_ms, overhead_ms, kernel_floor_ms, and the same four for the prompt}}, each
    median (min-max) over `rounds` alternating rounds of `runs` calls (a quarter of them for the prompt and its
    products), for engine systems given as loaded `Engine`s (the suite's own) or export folders. One system at
    a time, since its timers hold a second copy of its weights (gpt2-large fp32: 3 GB); within a system the
    engine's own step and prompt are timed in the same rounds as their floors, so they share the machine's
    moment."""
    from gpt2_onnx.engine import Engine

    from .measure import SETTLE_S, median_ms, spread

    floors, evict = {}, cache_evictor()
    for name, engine in engines.items():
        engine = engine if isinstance(engine, Engine) else Engine(engine, threads=threads)
        timers = system_timers(engine, threads, runs)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
        for round_ in range(rounds):
            for key in list(timers) if round_ % 2 == 0 else list(timers)[::-1]:
                start, call, calls = timers[key]
                start()
                time.sleep(SETTLE_S)  # the previous session's pool stops spinning
                times[key].append(median_ms(call, calls, WARMUP, before=evict if key[1] in COLD_PARTS else None))
        del timers
        gc.collect()  # the sessions' weights go before the next system's load
        floors[name] = {}
        for pass_, prefix in PASSES.items():
            products = np.array(times[pass_, "products"])
            overhead = np.maximum(0.0, np.array(times[pass_, "hollow"]) - np.array(times[pass_, "stand_ins"]))
            floors[name] |= {f"{pass_}_ms": spread(np.array(times[pass_, "engine"])),
                             f"{prefix}products_ms": spread(products), f"{prefix}overhead_ms": spread(overhead),
                             f"{prefix}kernel_floor_ms": spread(products + overhead)}
    return floors


def main(argv: list[str] | None = None) -> int:
    from gpt2_onnx.engine.manifest import Manifest
    from gpt2_onnx.errors import Gpt2OnnxError, first_line

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dirs", type=Path, nargs="+", help="engine exports of one checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=100, help="calls per round (median)")
    args = parser.parse_args(argv)
    try:
        folders = {f"engine-{Manifest.read(folder).precision}": folder for folder in args.model_dirs}
        floors = kernel_floors(folders, args.threads, args.rounds, args.runs)
    except Gpt2OnnxError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 1
    for name, floor in floors.items():
        print(json.dumps({"system": name, "folder": str(folders[name]), "threads": args.threads, **floor}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
