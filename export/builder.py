"""The fast graph: GPT-2 written op by op from the weights, as onnxruntime-genai's model builder does.

Per layer (com.microsoft contrib ops, fused kernels on CPU and CUDA):

    h, residual ──► qkv = Linear(h) ──► GroupQueryAttention(packed qkv, past/present KV buffer)
                                           │
    h, residual ◄── LayerNorm(residual += Linear(attn) + bias) ◄──┘
         │
         └─► Linear(c_fc) ─► FastGelu(+bias) ─► Linear(c_proj) ─► LayerNorm(residual += ... + bias)
                                                                    (the next layer's ln_1, or ln_f)

The residual add and its LayerNorm are Add + LayerNormalization, the bias inside the int8/int4 product;
fp16 graphs (for CUDA) use the fused SkipLayerNormalization instead (`GraphWriter.skip_layer_norm`).

The KV cache is one buffer per layer and kind, [B, H, T_max, D], bound as both `past_key_values.{i}.*`
and `present.{i}.*`: GroupQueryAttention writes only the new rows (int8 with `--kv-cache int8`, kv_cache.py). `seqlens_k[b]` is the number of tokens
in row b's cache after this step minus one; `total_sequence_length` the longest row's count. Only the
positions listed in `logits_positions` (-1: the last) go on after the last layer's attention (its output
projection, MLP and ln_f) to the LM head, which reads the (possibly quantized) embedding table stored once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .lm_head import embedding_and_head
from .quantize import QuantConfig, quantize_blockwise, quantize_per_channel_int8

Store = Callable[[np.ndarray, str], onnx.TensorProto]  # array, name -> initializer (inline or external)
OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


@dataclass(frozen=True)
class GraphShape:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    layer_norm_epsilon: float

    @classmethod
    def from_config(cls, config) -> GraphShape:
        return cls(config.n_layer, config.n_head, config.n_embd, config.n_positions, config.vocab_size,
                   config.layer_norm_epsilon)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class GraphWriter:
    """Collects nodes and initializers; names follow `/model/layers.{i}/attn/qkv_proj/MatMul`."""

    def __init__(self, quant: QuantConfig, store: Store = numpy_helper.from_array) -> None:
        self.quant, self.store = quant, store
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.max_weight_error = 0.0

    def weight(self, name: str, array: np.ndarray) -> str:
        array = array if array.flags.c_contiguous else array.copy()  # (ascontiguousarray would make 0-d 1-d)
        self.initializers.append(self.store(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outputs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def one(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        """`op` for a node with one output: its name."""
        return self.op(op_type, inputs, name, **attrs)[0]

    @contextmanager
    def branch(self) -> Iterator[list[onnx.NodeProto]]:
        """Nodes made inside go to the yielded list (an If branch's subgraph) instead of the graph; weights
        stay the graph's, which a subgraph may read."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    def linear(self, name: str, x: str, weight_kn: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ W (+ bias) at the block precision: MatMul, DynamicQuantizeMatMul (int8) or MatMulNBits (int4)."""
        k, n = weight_kn.shape
        bits = self.quant.block_bits
        if bits == 4 or (bits == 8 and self.quant.int8_kernel == "MatMulNBits"):
            stored = self.blockwise(name, weight_kn, bits, self.quant.symmetric)
            return self.matmul_nbits(name, x, stored, k, n, bits,
                                     self.weight(f"{name}.bias", bias) if bias is not None else "")
        if bits == 8:
            return self.dynamic_quantize_matmul(name, x, weight_kn, bias)
        dtype = self.quant.compute_dtype
        if dtype != np.float32:
            self.max_weight_error = max(self.max_weight_error, float(np.abs(weight_kn - weight_kn.astype(dtype)).max()))
        weight = self.weight(f"{name}.weight", weight_kn.astype(dtype, copy=False))
        out = self.op("MatMul", [x, weight], f"{name}/MatMul")[0]
        if bias is None:
            return out
        return self.op("Add", [out, self.weight(f"{name}.bias", bias.astype(dtype, copy=False))], f"{name}/Add")[0]

    def dynamic_quantize_matmul(self, name: str, x: str, weight_kn: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ W (+ bias) with W int8 per output channel and x quantized per call (integer dot products over
        whole rows: onnxruntime's fastest int8 product for many rows)."""
        q8, scales, error = quantize_per_channel_int8(weight_kn)
        self.max_weight_error = max(self.max_weight_error, error)
        inputs = [x, self.weight(f"{name}.qweight", q8), self.weight(f"{name}.scales", scales), "",
                  self.weight(f"{name}.bias", bias) if bias is not None else ""]
        return self.one("DynamicQuantizeMatMul", _trim(inputs), f"{name}/DynamicQuantizeMatMul", domain="com.microsoft")

    def blockwise(self, name: str, weight_kn: np.ndarray, bits: int, symmetric: bool) -> list[str]:
        """W [K, N] quantized into MatMulNBits blocks and stored: [packed, scales, zero points or ""]."""
        q = quantize_blockwise(weight_kn, bits, self.quant.block_size, symmetric)
        self.max_weight_error = max(self.max_weight_error, q.max_abs_error)
        return [self.weight(f"{name}.qweight", q.packed), self.weight(f"{name}.scales", q.scales.reshape(-1)),
                self.weight(f"{name}.zeros", q.zero_points) if q.zero_points is not None else ""]

    def matmul_nbits(self, name: str, x: str, stored: list[str], k: int, n: int, bits: int, bias: str = "") -> str:
        """x @ W for W stored by `blockwise` (K x N, `bits` wide), plus an optional stored bias."""
        return self.one("MatMulNBits", _trim([x, *stored, "", bias]), f"{name}/MatMulNBits", domain="com.microsoft",
                        K=k, N=n, bits=bits, block_size=self.quant.block_size, accuracy_level=self.quant.accuracy_level)

    def to_compute(self, x: str, name: str) -> str:
        """The residual stream is fp32; in fp16 graphs the products read an fp16 copy of it."""
        if self.quant.compute_dtype == np.float32:
            return x
        return self.op("Cast", [x], f"{name}/Cast_to_compute", to=TensorProto.FLOAT16)[0]

    def to_residual(self, x: str, name: str) -> str:
        if self.quant.compute_dtype == np.float32:
            return x
        return self.op("Cast", [x], f"{name}/Cast_to_residual", to=TensorProto.FLOAT)[0]

    def skip_layer_norm(self, name: str, x: str, skip: str, weights: dict, prefix: str, eps: float,
                        bias: np.ndarray | None = None) -> tuple[str, str]:
        """LayerNorm(x + skip + bias) and the sum itself (the new residual).

        One fused SkipLayerNormalization in fp16 graphs (CUDA's kernel). Elsewhere Add + LayerNormalization:
        onnxruntime's CPU SkipLayerNormalization measured ~3x slower than the two (768 wide, 2 threads: 65 vs
        21 us at 32 rows, 5.0 vs 2.1 at one), 1.1 ms of a 32-token int8 prefill (14.6 ms)."""
        gamma = self.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
        beta = self.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
        bias_name = self.weight(f"{name}.skip_bias", bias) if bias is not None else ""
        if self.quant.compute_dtype == np.float16:
            outs = self.op("SkipLayerNormalization", _trim([x, skip, gamma, beta, bias_name]), f"{name}/SkipLayerNorm",
                           n_out=4, domain="com.microsoft", epsilon=eps)
            self.nodes[-1].output[1:3] = ["", ""]  # mean and inverse std are not needed
            return outs[0], outs[3]
        total = self.one("Add", [x, skip], f"{name}/Add")
        if bias_name:
            total = self.one("Add", [total, bias_name], f"{name}/AddBias")
        return self.one("LayerNormalization", [total, gamma, beta], f"{name}/LayerNorm", axis=-1, epsilon=eps), total

    def project_into_residual(self, name: str, x: str, weight_kn: np.ndarray, bias: np.ndarray, residual: str,
                              weights: dict, norm: str, eps: float) -> tuple[str, str]:
        """residual + x @ W + bias (the new residual) and its LayerNorm `norm`: (normed, residual).

        The bias rides in the product (free in the int8/int4 kernels), except in fp16 graphs, where the
        fused SkipLayerNormalization adds it in fp32."""
        if self.quant.compute_dtype == np.float16:
            out = self.to_residual(self.linear(name, x, weight_kn), name)
            return self.skip_layer_norm(f"{name}/norm", out, residual, weights, norm, eps, bias)
        return self.skip_layer_norm(f"{name}/norm", self.linear(name, x, weight_kn, bias), residual, weights, norm, eps)


def build_graph(weights: Mapping[str, np.ndarray], shape: GraphShape, quant: QuantConfig,
                store: Store = numpy_helper.from_array, progress: bool = False) -> tuple[onnx.ModelProto, float]:
    """Weights (HF GPT-2 state dict as numpy, `transformer.` prefix removed) -> the fast graph and the
    largest weight error its quantizer made (0 for fp32).

    Weights are read one at a time, layer by layer, and each initializer goes to `store` as soon as it
    is made (see external_data.py), so only one layer's temporaries exist at once; `progress` shows a
    bar per layer.
    """
    from tqdm import tqdm

    g = GraphWriter(quant, store)
    w = weights
    embed, lm_head = embedding_and_head(g, w["wte.weight"], shape)
    tokens = embed("input_ids")
    positions = g.op("Gather", [g.weight("wpe.weight", w["wpe.weight"]), "position_ids"], "/model/embed_positions/Gather")[0]
    h, residual = g.skip_layer_norm("/model/layers.0/input_layernorm", tokens, positions, w, "h.0.ln_1",
                                    shape.layer_norm_epsilon)
    query_seqlens = _query_seqlens(g) if g.quant.kv_cache == "int8" else ""
    for i in tqdm(range(shape.n_layer), desc="      layers", unit="layer", leave=False, disable=not progress):
        p, name = f"h.{i}", f"/model/layers.{i}"
        qkv = g.linear(f"{name}/attn/qkv_proj", g.to_compute(h, f"{name}/attn"), w[f"{p}.attn.c_attn.weight"],
                       w[f"{p}.attn.c_attn.bias"])
        cache = [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                 "total_sequence_length"]
        quantized = {}
        if g.quant.kv_cache == "int8":  # inputs 12 and 13: the per-channel scales (kv_cache.py)
            cache += [""] * 5 + [g.weight(f"{name}/attn/{kind}_scale", w[f"{p}.attn.{kind}_scale"]) for kind in "kv"]
            cache += ["", "", query_seqlens]  # input 16
            quantized = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        attn, present_k, present_v = g.op("GroupQueryAttention", cache, f"{name}/attn/GroupQueryAttention", n_out=3,
                                          domain="com.microsoft", num_heads=shape.n_head, kv_num_heads=shape.n_head,
                                          **quantized)
        g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
        if i == shape.n_layer - 1:
            # the cache is written: from here on the layer serves only the LM head, so only the positions that
            # ask for logits go on ([B, S, E] -> [B, N, E]: the last while generating, every one for prompt
            # log-probabilities). Exact, and a 32-token prompt skips 31/32 of a layer's last three products.
            attn = g.one("Gather", [attn, "logits_positions"], f"{name}/attn/logits_positions/Gather", axis=1)
            residual = g.one("Gather", [residual, "logits_positions"], f"{name}/residual/logits_positions/Gather", axis=1)
        h, residual = g.project_into_residual(f"{name}/attn/o_proj", attn, w[f"{p}.attn.c_proj.weight"],
                                              w[f"{p}.attn.c_proj.bias"], residual, w, f"{p}.ln_2",
                                              shape.layer_norm_epsilon)
        up = g.linear(f"{name}/mlp/fc", g.to_compute(h, f"{name}/mlp"), w[f"{p}.mlp.c_fc.weight"])
        fc_bias = w[f"{p}.mlp.c_fc.bias"].astype(g.quant.compute_dtype, copy=False)
        act = g.op("FastGelu", [up, g.weight(f"{name}/mlp/fc.bias", fc_bias)],
                   f"{name}/mlp/FastGelu", domain="com.microsoft")[0]
        next_norm = f"h.{i + 1}.ln_1" if i + 1 < shape.n_layer else "ln_f"
        h, residual = g.project_into_residual(f"{name}/mlp/proj", act, w[f"{p}.mlp.c_proj.weight"],
                                              w[f"{p}.mlp.c_proj.bias"], residual, w, next_norm,
                                              shape.layer_norm_epsilon)
    # h: [B, N, E], the positions asked for; logits are fp32 for every precision
    g.to_residual(lm_head(g.to_compute(h, "/lm_head")), "/lm_head")
    g.nodes[-1].output[0] = "logits"  # the last node's output is the graph's
    return _model(g, shape), g.max_weight_error


def _query_seqlens(g: GraphWriter) -> str:
    """Each row's new tokens in this pass, [B] int32: min(seqlens_k + 1, S), i.e. a prompt's own length in its
    right-padded row of an empty cache, 1 in a decode step. GroupQueryAttention's quantized-cache kernel then
    skips the padding: a 32-token int4 prompt with the int8 cache 14.05 against 14.36 ms (fastest of 60,
    interleaved call by call); no change measured with the float cache, which does without it."""
    width = g.one("Shape", ["input_ids"], "/model/query_seqlens/Shape", start=1, end=2)
    width = g.one("Cast", [width], "/model/query_seqlens/Cast", to=TensorProto.INT32)
    total = g.one("Add", ["seqlens_k", g.weight("query_seqlens.one", np.array(1, np.int32))], "/model/query_seqlens/Add")
    return g.one("Min", [total, width], "/model/query_seqlens/Min")


def _model(g: GraphWriter, shape: GraphShape) -> onnx.ModelProto:
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    kv = TensorProto.FLOAT16 if g.quant.compute_dtype == np.float16 else TensorProto.INT8 if g.quant.kv_cache == "int8" else f32
    cache = ["batch_size", shape.n_head, "max_sequence_length", shape.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("seqlens_k", i32, ["batch_size"]),
              helper.make_tensor_value_info("total_sequence_length", i32, []),
              helper.make_tensor_value_info("logits_positions", i64, ["num_logits"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "num_logits", shape.vocab_size])]
    for i in range(shape.n_layer):
        for name in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{name}", kv, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{name}", kv, cache))
    graph = helper.make_graph(g.nodes, "gpt2", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=OPSET, producer_name="gpt2-onnx")


def _trim(inputs: list[str]) -> list[str]:
    """Optional inputs may be left out at the end only."""
    while inputs and not inputs[-1]:
        inputs.pop()
    return inputs
