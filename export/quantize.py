"""Weight quantization: block-wise int4/int8 for com.microsoft MatMulNBits (and GatherBlockQuantized).

`QuantConfig` is the explicit recipe (never guessed from a file name). The math follows MatMulNBits'
layout: a weight W [K, N] is stored transposed and blocked along K as uint8 [N, K/block, block*bits/8]
(two 4-bit values per byte, low nibble first) with float scales [N, K/block] and, when asymmetric,
uint8 zero points; the value is (q - zero_point) * scale, and the default zero point is 2^(bits-1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gpt2_onnx.engine.manifest import INT8_KERNELS, KV_CACHES, PRECISIONS
from gpt2_onnx.errors import Gpt2OnnxError

BLOCK_SIZES = (16, 32, 64, 128, 256)
# Measured on an AVX-512 VNNI machine (gpt2, 2 threads, same run): int4 blocks of 128 decode in 3.4-3.7 ms a
# token against 4.5-5.1 at 32 (per-block scale work, in the head as in the blocks), batch 16 +15-20 %, for
# 0.3 points of top-1 agreement on the trained fixture (README's quantization table). Blocks of 256 then took
# the 4-bit products of a gpt2 step from 2.07 to 1.59 ms (gpt2-large's from 14.5 to 13.0; medians of 10
# alternating rounds) and a whole step from 3.70 to 3.40 ms, for 0.05 points. int8 keeps 128: its whole step
# gained 1-4 % at 256 for 0.12 points (0.9957 against 0.9969), and int8 is the precision kept close to fp32.
AUTO_BLOCK_SIZES = (128, 64, 32)
INT4_AUTO_BLOCK_SIZES = (256, *AUTO_BLOCK_SIZES)
MAX_SHORTLIST = 1024  # LM-head candidates re-scored exactly; more would cost what the shortlist saves
# int8 blocks by CPU class. With the weights on huge pages (engine/hugepages.py), on an AVX-512 VNNI host
# (2 threads, alternating processes) 8-bit MatMulNBits decoded a gpt2 token in 3.84-4.16 ms against
# DynamicQuantizeMatMul's 4.34-4.71, gpt2-large 27.0-29.0 against 29.2-30.6; but it took 19.2 ms for a
# 32-token prompt against 12.9 and 17.3 ms for a 16-row step against 14.1, so it comes with the int8
# batched graph for those (export/batched.py), at ~1.7x the folder. Without VNNI its integer dot products
# measured slower than DynamicQuantizeMatMul's: such CPUs keep the smaller DynamicQuantizeMatMul export.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_kernel_for_this_cpu() -> str:
    """int8's block kernel for the CPU that exports (the folder is meant for machines of its class)."""
    return "MatMulNBits" if cpu_flags() & set(VNNI_FLAGS) else "DynamicQuantizeMatMul"


@dataclass(frozen=True)
class QuantConfig:
    precision: str = "fp32"
    # along K; smaller blocks track outliers better and cost more scales. None: the largest of AUTO_BLOCK_SIZES
    # (INT4_AUTO_BLOCK_SIZES for int4) that divides the width (gpt2 to gpt2-large: int4 256, int8 128; gpt2-xl's
    # 1,600: 64), resolved by `for_width`
    block_size: int | None = None
    symmetric: bool = True  # False stores a zero point per block (min/max range, as llama.cpp's Q4_1)
    lm_head_bits: int | None = None  # the tied embedding / LM head; None: same as the blocks
    accuracy_level: int = 4  # MatMulNBits: 4 = activations in int8, so the CPU computes with integer dot products
    # int8 blocks: DynamicQuantizeMatMul (per-channel weights, per-tensor activations) or MatMulNBits
    # (block-wise weights and activations: more accurate, a slower kernel on AVX2)
    int8_kernel: str | None = None  # None: int8_kernel_for_this_cpu() for int8, else DynamicQuantizeMatMul
    # an 8-bit LM head scores every token with a 4-bit copy of the table first and re-scores only this many
    # best from the 8 bits (lm_head.py); 0: the plain 8-bit head
    head_shortlist: int = 32
    # MatMulNBits blocks: also write the int8 graph that runs prefills and wide batches faster (batched.py)
    batched_graph: bool = True
    # an 8-bit head: passes of many logits rows multiply with a per-channel int8 copy of the table instead
    # (DynamicQuantizeMatMul; lm_head.py), at the table's size again (gpt2: 38.6 MB)
    wide_head: bool = False
    # the KV cache: float32, or int8 with per-channel scales calibrated on text (kv_cache.py)
    kv_cache: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise Gpt2OnnxError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise Gpt2OnnxError(f"block_size {self.block_size} is not supported; choose one of {BLOCK_SIZES}")
        if self.int8_kernel is None:  # resolved once, so the manifest and the bench's cache key record the kernel
            kernel = int8_kernel_for_this_cpu() if self.precision == "int8" else "DynamicQuantizeMatMul"
            object.__setattr__(self, "int8_kernel", kernel)
        if self.int8_kernel not in INT8_KERNELS:
            raise Gpt2OnnxError(f"unknown int8 kernel {self.int8_kernel!r}; choose one of {', '.join(INT8_KERNELS)}")
        if not 0 <= self.head_shortlist <= MAX_SHORTLIST:
            raise Gpt2OnnxError(f"head_shortlist must be 0 (off) to {MAX_SHORTLIST}, not {self.head_shortlist}")
        if self.lm_head_bits not in (None, 4, 8, 32):
            raise Gpt2OnnxError("lm_head_bits must be 4, 8 or 32 (fp32)")
        if self.kv_cache not in KV_CACHES:
            raise Gpt2OnnxError(f"unknown KV cache {self.kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
        if self.kv_cache != "float32" and self.precision == "fp16":
            raise Gpt2OnnxError("fp16 graphs keep an fp16 KV cache; --kv-cache int8 is for fp32, int8 and int4")

    @classmethod
    def fp32(cls) -> QuantConfig:
        return cls("fp32")

    @classmethod
    def fp16(cls) -> QuantConfig:
        """Weights, matrix products, attention and KV cache in fp16; the residual stream, LayerNorms and
        the logits stay fp32 (GPT-2's activations overflow fp16 there)."""
        return cls("fp16")

    @classmethod
    def int8(cls, block_size: int | None = None, symmetric: bool = True, kernel: str | None = None) -> QuantConfig:
        """`kernel` None: the faster one for this CPU (`int8_kernel_for_this_cpu`), recorded in the manifest."""
        return cls("int8", block_size=block_size, symmetric=symmetric, int8_kernel=kernel)

    @classmethod
    def int4(cls, block_size: int | None = None, symmetric: bool = True, lm_head_bits: int | None = 8) -> QuantConfig:
        return cls("int4", block_size=block_size, symmetric=symmetric, lm_head_bits=lm_head_bits)

    @property
    def block_bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.precision)

    @property
    def head_bits(self) -> int | None:
        bits = self.lm_head_bits or self.block_bits
        return None if bits == 32 else bits

    @property
    def shortlist(self) -> int:
        """LM-head candidates re-scored from the 8-bit table: `head_shortlist` where the head is 8-bit, else 0."""
        return self.head_shortlist if self.head_bits == 8 else 0

    @property
    def compute_dtype(self) -> type:
        """The type of the matrix products, attention and KV cache."""
        return np.float16 if self.precision == "fp16" else np.float32

    def for_width(self, n_embd: int) -> QuantConfig:
        """This recipe for a model `n_embd` wide: the block size resolved and checked."""
        fitting = [b for b in BLOCK_SIZES if n_embd % b == 0]
        if self.block_size is None:
            choices = INT4_AUTO_BLOCK_SIZES if self.precision == "int4" else AUTO_BLOCK_SIZES
            auto = [b for b in choices if n_embd % b == 0] or fitting[-1:]
            if not auto:
                raise Gpt2OnnxError(f"no block size of {BLOCK_SIZES} divides the hidden size {n_embd}")
            return replace(self, block_size=auto[0])
        if self.block_bits and n_embd % self.block_size:
            raise Gpt2OnnxError(f"block_size {self.block_size} does not divide the hidden size {n_embd}; "
                                f"choose one of {fitting}")
        return self


@dataclass(frozen=True)
class BlockQuantized:
    """One weight in MatMulNBits layout, for W [K, N] (x @ W)."""

    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray | None  # uint8 [N, ceil(K/block*bits/8)] packed like the weights, or None
    bits: int
    block_size: int
    max_abs_error: float  # max |W - dequantize(W)|, the quantizer's own error report

    @property
    def k(self) -> int:
        return self.packed.shape[1] * self.block_size

    @property
    def n(self) -> int:
        return self.packed.shape[0]


def quantize_blockwise(weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """W [K, N] -> MatMulNBits blocks. Symmetric uses the zero point 2^(bits-1) implicitly."""
    w = np.ascontiguousarray(weight_kn.T, dtype=np.float32)  # [N, K]
    n, k = w.shape
    assert k % block_size == 0, f"K={k} is not a multiple of block {block_size}"
    blocks = w.reshape(n, k // block_size, block_size)
    qmax = 2**bits - 1
    if symmetric:
        # the signed extreme maps to -2^(bits-1), so the whole [-8, 7] (or [-128, 127]) range is used
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        scales = extreme / -(2 ** (bits - 1))
        zero = np.full(scales.shape, 2 ** (bits - 1), np.float32)
    else:
        low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scales = (high - low) / qmax
        zero = np.clip(np.round(-low / np.where(scales == 0, 1, scales)), 0, qmax)
    safe = np.where(scales == 0, 1, scales)[..., None]
    q = np.clip(np.round(blocks / safe + zero[..., None]), 0, qmax).astype(np.uint8)
    error = float(np.abs((q.astype(np.float32) - zero[..., None]) * scales[..., None] - blocks).max())
    zero_points = None if symmetric else _pack(zero.astype(np.uint8), bits)
    if zero_points is not None and bits == 4:
        zero_points = zero_points.reshape(n, -1)
    return BlockQuantized(_pack(q, bits), scales.astype(np.float32), zero_points, bits, block_size, error)


def dequantize(q: BlockQuantized) -> np.ndarray:
    """Back to W [K, N] in float32 (for tests and error reports)."""
    values = _unpack(q.packed, q.bits).astype(np.float32)  # [N, K/block, block]
    if q.zero_points is None:
        zero = np.float32(2 ** (q.bits - 1))
    else:
        zero = _unpack(q.zero_points, q.bits)[:, : q.scales.shape[1], None].astype(np.float32)
    return ((values - zero) * q.scales[..., None]).reshape(q.n, q.k).T


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def quantize_per_channel_int8(weight_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """W [K, N] -> int8 [K, N] and one float scale per output column (symmetric, as onnxruntime's
    dynamic per-channel quantization); activations are quantized at run time by DynamicQuantizeMatMul."""
    scales = np.abs(weight_kn).max(axis=0) / 127.0
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    q = np.clip(np.round(weight_kn / scales), -127, 127).astype(np.int8)
    error = float(np.abs(q.astype(np.float32) * scales - weight_kn).max())
    return q, scales, error
