"""Torch model -> ONNX: the fast graph (builder.py, streamed to disk) or Optimum's reference graph.

The reference graph is Optimum's `text-generation-with-past` export: one graph takes `input_ids`,
`attention_mask`, `position_ids` and `past_key_values.{i}.key/value` (empty on the first step) and
returns `logits` and `present.{i}.key/value`. Two fixes on top of Optimum's output: the tied LM head
reads the embedding table instead of storing a transposed copy, and models over 2 GB keep their weights
in one external data file. Either graph over protobuf's limit is `model.onnx` + `model.onnx.data`.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gpt2_onnx.engine.manifest import MODEL_FILE

from .external_data import EXTERNAL_DATA_FILE

PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # stay clear of protobuf's 2 GiB ceiling
EMBEDDING = "transformer.wte.weight"


def export_reference_graph(model, work_dir: Path) -> Path:
    """Write `model.onnx` (and its data file when large) into `work_dir`; returns the model path."""
    from optimum.exporters.onnx import onnx_export_from_model

    raw_dir = work_dir / "optimum"
    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        onnx_export_from_model(model, raw_dir, task="text-generation-with-past", do_validation=False)
    graph = onnx.load(str(raw_dir / MODEL_FILE))
    untie_lm_head_copy(graph)
    path = work_dir / MODEL_FILE
    save_model(graph, path)
    shutil.rmtree(raw_dir, ignore_errors=True)
    return path


def untie_lm_head_copy(model: onnx.ModelProto) -> None:
    """Replace the LM head's stored copy of wte^T by a Transpose of wte (saves vocab x n_embd x 4 bytes).

    torch.onnx traces `lm_head.weight` (tied to wte) as a separate, pre-transposed initializer.
    onnxruntime folds the Transpose once at load time, so the run-time graph is unchanged. A checkpoint
    whose head is not tied to its embedding keeps its own head, as it must.
    """
    inits = {init.name: init for init in model.graph.initializer}
    if EMBEDDING not in inits:
        return
    wte = numpy_helper.to_array(inits[EMBEDDING])
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if tuple(weight.dims) != wte.shape[::-1] or not np.array_equal(numpy_helper.to_array(weight), wte.T):
            continue
        transposed = "lm_head.weight_transposed"
        model.graph.node.insert(0, helper.make_node("Transpose", [EMBEDDING], [transposed], perm=[1, 0],
                                                    name="/lm_head/Transpose"))
        model.graph.initializer.remove(weight)
        for consumer in model.graph.node:
            for i, name in enumerate(consumer.input):
                if name == weight.name:
                    consumer.input[i] = transposed
        return


def save_model(model: onnx.ModelProto, path: Path, location: str = EXTERNAL_DATA_FILE) -> None:
    """Save in one file, or with one external data file (`location`, beside it) when over protobuf's limit."""
    if weight_bytes(model) > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def weight_bytes(model: onnx.ModelProto) -> int:
    """Initializer bytes, counted from shapes (ByteSize() itself fails past 2 GiB)."""
    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT64: 8}
    return int(sum(np.prod(i.dims, dtype=np.int64) * sizes.get(i.data_type, 1) for i in model.graph.initializer))


class _quiet_loggers:
    """Optimum and torch.onnx log tracer warnings that mean nothing to a user of this tool."""

    names = ("optimum", "transformers", "torch.onnx")

    def __enter__(self):
        self.levels = {n: logging.getLogger(n).level for n in self.names}
        for name in self.names:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def numpy_weights(model) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's state dict as fp32 numpy (views, not copies), without the `transformer.` prefix and
    the causal-mask buffers."""
    return {name.removeprefix("transformer."): tensor.detach().float().numpy()
            for name, tensor in model.state_dict().items() if not name.endswith(".attn.bias")}


def export_fast_graph(model, work_dir: Path, quant, kv_scales: dict[str, np.ndarray] | None = None) -> tuple[Path, float]:
    """Write the op-by-op fast graph (see builder.py) at `quant`'s precision, an int8 KV cache with
    `kv_scales` (kv_cache.py); returns its path and the quantizer's max weight error.

    Initializers stream into `model.onnx.data` layer by layer (external_data.py): besides the torch
    model, memory holds one layer's temporaries. A model that ends up under protobuf's limit is then
    copied into a single `model.onnx`, one tensor at a time.
    """
    from .builder import GraphShape, build_graph
    from .external_data import ExternalDataWriter, save_embedded

    weights = numpy_weights(model) | (kv_scales or {})
    with ExternalDataWriter(work_dir) as data:
        graph, max_error = build_graph(weights, GraphShape.from_config(model.config), quant, store=data.tensor,
                                       progress=True)
    path = work_dir / MODEL_FILE
    if data.size <= PROTOBUF_LIMIT:
        save_embedded(graph, work_dir, path)
    else:
        onnx.save_model(graph, str(path))
    return path, max_error

