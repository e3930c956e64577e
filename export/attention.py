"""The inspection graph `attention.onnx`: GPT-2 op by op in standard ONNX ops, outputting attention probabilities.

Written beside model.onnx by `gpt2-onnx export ... --with-attention` from the checkpoint's fp32 weights
(whatever the fast graph's precision), so the fast graph stays lean. One sequence, no KV cache:

    input_ids [S] ─► Gather(wte) + wpe[:S] ─► x [S, E]
    per layer:  LayerNorm ─► MatMul c_attn ─► Split q, k, v ─► [H, S, D]
                softmax(q kᵀ / √D, causal) ───────────────────────────────► probs [H, S, S] ─┐
                probs v ─► [S, E] ─► MatMul c_proj ─► + x ─► (LayerNorm ─► MLP ─► + x)         │
    attentions [L, H, S, S] ◄── Concat over layers ◄────────────────────────────────────────────┘

The last layer's MLP, ln_f and the LM head do not affect any attention and are left out. The causal mask
is transformers' (the score above the diagonal is float32's minimum), so the probabilities are
`GPT2LMHeadModel(..., output_attentions=True).attentions` stacked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gpt2_onnx.engine.attention import ATTENTION_FILE, INPUT, OUTPUT

from .builder import GraphShape, GraphWriter
from .quantize import QuantConfig
from .to_onnx import numpy_weights, save_model

OPSET = [helper.make_opsetid("", 17)]
DATA_FILE = f"{ATTENTION_FILE}.data"


def build_attention_graph(weights: dict[str, np.ndarray], shape: GraphShape) -> onnx.ModelProto:
    """`weights` are GPT2Model's state dict (names without the `transformer.` prefix), fp32 numpy."""
    w, g = weights, GraphWriter(QuantConfig.fp32())
    eps = shape.layer_norm_epsilon
    s = g.one("Shape", [INPUT], "/model/seq_len/Shape")  # [1] = S
    positions = g.one("Slice", [g.weight("wpe.weight", w["wpe.weight"]), g.weight("start", np.array([0], np.int64)), s],
                      "/model/embed_positions/Slice")  # wpe[:S]
    x = g.one("Add", [g.one("Gather", [g.weight("wte.weight", w["wte.weight"]), INPUT], "/model/embed_tokens/Gather"),
                      positions],
              "/model/embed/Add")
    causal = _causal_mask(g, s)
    layer_probs = []
    for i in range(shape.n_layer):
        x, probs = _layer(g, w, shape, i, x, causal, eps, last=i == shape.n_layer - 1)
        first_axis = g.weight(f"h.{i}.axis0", np.array([0], np.int64))
        layer_probs.append(g.one("Unsqueeze", [probs, first_axis], f"/model/layers.{i}/attn/probs/Unsqueeze"))
    g.nodes.append(helper.make_node("Concat", layer_probs, [OUTPUT], name="/model/attentions/Concat", axis=0))
    graph = helper.make_graph(
        g.nodes, "gpt2-attention", [helper.make_tensor_value_info(INPUT, TensorProto.INT64, ["sequence"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT,
                                       [shape.n_layer, shape.n_head, "sequence", "sequence"])],
        g.initializers)
    return helper.make_model(graph, opset_imports=OPSET, producer_name="gpt2-onnx")


def _causal_mask(g: GraphWriter, s: str) -> str:
    """[S, S] bool, true on and below the diagonal: token i sees tokens 0..i."""
    square = g.one("Concat", [s, s], "/model/mask/Concat", axis=0)
    ones = g.one("ConstantOfShape", [square], "/model/mask/ConstantOfShape",
                 value=numpy_helper.from_array(np.array([1], np.int64)))
    return g.one("Cast", [g.one("Trilu", [ones], "/model/mask/Trilu", upper=0)], "/model/mask/Cast",
                 to=TensorProto.BOOL)


def _layer(g: GraphWriter, w: dict, shape: GraphShape, i: int, x: str, causal: str, eps: float,
           last: bool) -> tuple[str, str]:
    """One block: returns the residual stream after it and the attention probabilities [H, S, D]."""
    p, name = f"h.{i}.", f"/model/layers.{i}"
    e, h, d = shape.n_embd, shape.n_head, shape.head_dim
    ln1 = g.one("LayerNormalization", [x, g.weight(f"{p}ln_1.weight", w[f"{p}ln_1.weight"]),
                                       g.weight(f"{p}ln_1.bias", w[f"{p}ln_1.bias"])], f"{name}/ln_1", axis=-1,
                epsilon=eps)
    qkv = g.linear(f"{name}/attn/c_attn", ln1, w[f"{p}attn.c_attn.weight"], w[f"{p}attn.c_attn.bias"])  # [S, 3E]
    split = g.weight(f"{p}split", np.array([e, e, e], np.int64))
    q, k, v = g.op("Split", [qkv, split], f"{name}/attn/Split", n_out=3, axis=1)
    heads = g.weight(f"{p}heads", np.array([-1, h, d], np.int64))

    def per_head(t: str, kind: str, perm: list[int]) -> str:  # [S, E] -> [S, H, D] -> perm
        shaped = g.one("Reshape", [t, heads], f"{name}/attn/{kind}/Reshape")
        return g.one("Transpose", [shaped], f"{name}/attn/{kind}/Transpose", perm=perm)

    q, k, v = per_head(q, "q", [1, 0, 2]), per_head(k, "k", [1, 2, 0]), per_head(v, "v", [1, 0, 2])  # kᵀ: [H, D, S]
    scores = g.one("Mul", [g.one("MatMul", [q, k], f"{name}/attn/qk/MatMul"),
                           g.weight(f"{p}scale", np.array(1 / np.sqrt(d), np.float32))], f"{name}/attn/scale/Mul")
    masked = g.one("Where", [causal, scores, g.weight(f"{p}min", np.array(np.finfo(np.float32).min, np.float32))],
                   f"{name}/attn/mask/Where")
    probs = g.one("Softmax", [masked], f"{name}/attn/Softmax", axis=-1)  # [H, S, S]
    if last:
        return x, probs
    context = g.one("Transpose", [g.one("MatMul", [probs, v], f"{name}/attn/pv/MatMul")], f"{name}/attn/ctx/Transpose",
                    perm=[1, 0, 2])  # [S, H, D]
    merged = g.one("Reshape", [context, g.weight(f"{p}merge", np.array([-1, e], np.int64))], f"{name}/attn/ctx/Reshape")
    x = g.one("Add", [x, g.linear(f"{name}/attn/c_proj", merged, w[f"{p}attn.c_proj.weight"],
                                  w[f"{p}attn.c_proj.bias"])], f"{name}/attn/residual/Add")
    ln2 = g.one("LayerNormalization", [x, g.weight(f"{p}ln_2.weight", w[f"{p}ln_2.weight"]),
                                       g.weight(f"{p}ln_2.bias", w[f"{p}ln_2.bias"])], f"{name}/ln_2", axis=-1,
                epsilon=eps)
    hidden = _gelu_new(g, g.linear(f"{name}/mlp/c_fc", ln2, w[f"{p}mlp.c_fc.weight"], w[f"{p}mlp.c_fc.bias"]),
                       f"{name}/mlp/gelu")
    out = g.linear(f"{name}/mlp/c_proj", hidden, w[f"{p}mlp.c_proj.weight"], w[f"{p}mlp.c_proj.bias"])
    return g.one("Add", [x, out], f"{name}/mlp/residual/Add"), probs


def _gelu_new(g: GraphWriter, x: str, name: str) -> str:
    """GPT-2's tanh GELU: 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))) (opset 17 has no Gelu)."""
    cube = g.one("Mul", [g.one("Mul", [x, x], f"{name}/sq"), x], f"{name}/cube")
    inner = g.one("Add", [x, g.one("Mul", [cube, g.weight(f"{name}.c", np.array(0.044715, np.float32))],
                                   f"{name}/c_mul")], f"{name}/inner")
    scaled = g.one("Mul", [inner, g.weight(f"{name}.k", np.array(np.sqrt(2 / np.pi), np.float32))], f"{name}/k_mul")
    gate = g.one("Add", [g.one("Tanh", [scaled], f"{name}/tanh"), g.weight(f"{name}.one", np.array(1, np.float32))],
                 f"{name}/gate")
    return g.one("Mul", [g.one("Mul", [x, gate], f"{name}/x_gate"), g.weight(f"{name}.half", np.array(0.5, np.float32))],
                 f"{name}/half")


def write_attention_graph(model, folder: Path) -> Path:
    """Build the graph from a transformers GPT2LMHeadModel and save it as folder/attention.onnx (with
    attention.onnx.data beside it past protobuf's 2 GB)."""
    graph = build_attention_graph(numpy_weights(model), GraphShape.from_config(model.config))
    path = folder / ATTENTION_FILE
    save_model(graph, path, location=DATA_FILE)
    return path
