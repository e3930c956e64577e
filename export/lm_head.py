"""The tied embedding table and LM head: one [V, E] table serves both, stored once.

Quantized (int8 and int4 exports: 8 bits by default), the table is blocks of MatMulNBits layout;
GatherBlockQuantized reads rows of it for the embedding and MatMulNBits multiplies with it for the head.

The head reads the whole table every decode step (gpt2: 38.6 MB at 8 bits, ~13 % of an int8 step), yet
only a handful of its 50,257 scores matter to a greedy or top-k/top-p choice. So with a shortlist
(`QuantConfig.head_shortlist`, default 32) the head first scores every token with a 4-bit copy of the
table (half the bytes), takes the best `shortlist` of those, and re-scores just them from the 8-bit rows
in fp32; the other tokens keep their 4-bit score. The 8-bit argmax stays exact whenever it is among the
4-bit top 32: on the trained fixture it was at every one of 10,240 positions already among the top 8.
TopK and the scatter cost more than the 4-bit product saves once many rows ask for logits at once (a
wide batch, prompt log-probabilities), so such passes take the full 8-bit head: an If on the row count.
With `QuantConfig.wide_head` (the batched graph's recipe) those passes multiply with a per-channel int8 copy
of the table instead (DynamicQuantizeMatMul: integer dot products over whole rows, ~1.7x faster than 8-bit
MatMulNBits from 16 rows), at the table's size again, from WIDE_HEAD_MIN_ROWS rows, shortlist or not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper


# Rows x logits positions up to which the shortlist runs; wider passes take the full 8-bit head. Measured
# in the gpt2 int8 graph (AVX-512 VNNI host, 2 threads): see README's quantization section.
SHORTLIST_MAX_ROWS = 8
# With `QuantConfig.wide_head`, passes of at least this many logits rows take the head from a per-channel int8
# copy of the table through DynamicQuantizeMatMul. The gpt2 head alone (AVX-512 VNNI host, 2 threads, fastest
# of alternating rounds): 8-bit MatMulNBits 0.7 / 1.5 / 2.3 / 3.9 / 7.0 / 13.2 ms at 1 / 4 / 8 / 16 / 32 / 64
# rows against 1.1 / 1.5 / 1.8 / 2.6 / 4.2 / 7.2: MatMulNBits dequantizes the blocks again for every row.
WIDE_HEAD_MIN_ROWS = 5

Head = Callable[[str], str]


def embedding_and_head(g, wte: np.ndarray, shape) -> tuple[Head, Head]:
    """`g` a GraphWriter, `wte` [V, E]: (token ids -> [B, S, E] embeddings, hidden [B, N, E] -> logits)."""
    bits = g.quant.head_bits
    if bits is None:
        return _dense(g, wte, shape)
    # block-wise, symmetric: GatherBlockQuantized reads the very bytes MatMulNBits multiplies with
    stored = g.blockwise("wte", wte.T, bits, symmetric=True)  # N = V rows, K = E: [V, E/block, block*bits/8]
    table, scales = stored[:2]
    row_scales = g.one("Reshape", [scales, g.weight("wte.scales_shape", np.array([shape.vocab_size, -1, 1]))],
                       "/model/embed_tokens/scales/Reshape")

    def gather_rows(ids: str, name: str, id_axes: int) -> str:
        """ids with `id_axes` axes -> the table's rows, dequantized: [*ids.shape, E]."""
        rows = g.one("GatherBlockQuantized", [table, ids, row_scales], f"{name}/GatherBlockQuantized",
                     domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=g.quant.block_size, bits=bits)
        return g.one("Reshape", [rows, g.weight(f"{name}/rows_shape", np.array([0] * id_axes + [-1]))],
                     f"{name}/Reshape")  # [..., E/block, block] -> [..., E]

    def embed(ids: str) -> str:
        return gather_rows(ids, "/model/embed_tokens", 2)  # [B, S]

    def head(x: str, name: str = "/lm_head") -> str:
        return g.matmul_nbits(name, x, stored, shape.n_embd, shape.vocab_size, bits)

    def per_channel_head(x: str, name: str) -> str:
        return g.dynamic_quantize_matmul(name, x, wte.T)

    wide = g.quant.wide_head and bits == 8
    many_rows = per_channel_head if wide else head
    shortlist = min(g.quant.shortlist, shape.vocab_size)
    if shortlist:
        # the shortlist was measured against the 8-bit head only: where the wide head exists, it takes over as it
        # would from the 8-bit head (WIDE_HEAD_MIN_ROWS)
        max_rows = WIDE_HEAD_MIN_ROWS - 1 if wide else SHORTLIST_MAX_ROWS
        return embed, _shortlisted(g, wte, shape, shortlist, max_rows, many_rows, gather_rows)
    if many_rows is head:
        return embed, head
    return embed, lambda x: _by_rows(g, x, WIDE_HEAD_MIN_ROWS - 1, head, many_rows, "/lm_head", "narrow", "wide")


def _by_rows(g, x: str, max_rows: int, few: Callable[[str, str], str], many: Callable[[str, str], str], name: str,
             few_name: str, many_name: str) -> str:
    """few(x) if x [B, N, E] has at most `max_rows` rows (B x N) else many(x): an If, both branches logits."""
    rows = g.one("ReduceProd", [g.one("Shape", [x], f"{name}/Shape", end=2)], f"{name}/rows", keepdims=0)
    is_few = g.one("LessOrEqual", [rows, g.weight(f"{name}/max_rows_{few_name}", np.array(max_rows))],
                   f"{name}/few_rows")
    branches = {}
    for branch, make in ((few_name, few), (many_name, many)):
        with g.branch() as nodes:
            out = make(x, f"{name}/{branch}")
        branches[branch] = helper.make_graph(nodes, branch, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    return g.one("If", [is_few], f"{name}/If", then_branch=branches[few_name], else_branch=branches[many_name])


def _shortlisted(g, wte: np.ndarray, shape, shortlist: int, max_rows: int,
                 full_head: Callable[[str, str], str], gather_rows: Callable[[str, str, int], str]) -> Head:
    stored4 = g.blockwise("wte4", wte.T, 4, symmetric=True)  # its error counts: the tail's scores come from it
    k = g.weight("lm_head.shortlist", np.array([shortlist], np.int64))
    last_axis = g.weight("lm_head.last_axis", np.array([-1], np.int64))

    def short(x: str, name: str) -> str:
        approx = g.matmul_nbits(f"{name}/approx", x, stored4, shape.n_embd, shape.vocab_size, 4)
        ids = g.op("TopK", [approx, k], f"{name}/TopK", n_out=2, axis=-1)[1]  # [B, N, shortlist]
        candidates = gather_rows(ids, f"{name}/candidates", 3)  # [B, N, shortlist, E], from the 8-bit table
        column = g.one("Unsqueeze", [x, last_axis], f"{name}/Unsqueeze")  # [B, N, E, 1]
        exact = g.one("Squeeze", [g.one("MatMul", [candidates, column], f"{name}/exact/MatMul"), last_axis],
                      f"{name}/Squeeze")
        return g.one("ScatterElements", [approx, ids, exact], f"{name}/ScatterElements", axis=-1)

    return lambda x: _by_rows(g, x, max_rows, short, full_head, "/lm_head", "shortlist", "full")


def _dense(g, wte: np.ndarray, shape) -> tuple[Head, Head]:
    table = g.weight("wte.weight", wte.astype(g.quant.compute_dtype, copy=False))

    def embed(ids: str) -> str:
        return g.to_residual(g.one("Gather", [table, ids], "/model/embed_tokens/Gather"), "/model/embed_tokens")

    def head(x: str) -> str:
        # Gemm(transB) multiplies by wte^T without a transposed copy, but only in 2-D: [B, N, E] -> [B*N, E]
        rows = g.one("Reshape", [x, g.weight("lm_head_rows", np.array([-1, shape.n_embd]))], "/lm_head/Reshape")
        flat = g.one("Gemm", [rows, table], "/lm_head/Gemm", transB=1)
        batch_positions = g.one("Shape", [x], "/lm_head/Shape", end=2)
        out_shape = g.one("Concat", [batch_positions, g.weight("vocab_size", np.array([shape.vocab_size]))],
                          "/lm_head/Concat", axis=0)
        return g.one("Reshape", [flat, out_shape], "/lm_head/Reshape_out")
    return embed, head
