"""Attention maps from the export's inspection graph (`attention.onnx`, written by `export --with-attention`).

The fast graph fuses attention into GroupQueryAttention and never materialises its probabilities; the
inspection graph is GPT-2 again, op by op in standard ONNX ops from the same (fp32) weights, whose one
output is every layer's and head's attention probabilities, as transformers' `output_attentions=True`:

    input_ids [S] ──► attentions [layers, heads, S, S]    (row i: what token i attends to; rows sum to 1)

It is opened on first use only, so an engine that never draws attention never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from gpt2_onnx.errors import Gpt2OnnxError, first_line

from .session import session_options

ATTENTION_FILE = "attention.onnx"
INPUT, OUTPUT = "input_ids", "attentions"


@dataclass(frozen=True)
class AttentionMaps:
    token_ids: list[int]
    tokens: list[str]  # each token's own text (its byte-level form when it holds part of a character)
    probs: np.ndarray = field(repr=False)  # [layers, heads, S, S] float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.probs.shape


class AttentionGraph:
    """One onnxruntime session over `attention.onnx` (CPU: it is an inspection tool, run once per prompt)."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        path = model_dir / ATTENTION_FILE
        if not path.is_file():
            raise Gpt2OnnxError(f"{model_dir} has no {ATTENTION_FILE}: re-export with "
                                f"`gpt2-onnx export SOURCE {model_dir} --force --with-attention`")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several pybind types; all mean the file is unusable
            raise Gpt2OnnxError(f"could not load {path}: {first_line(exc)}; re-export with --with-attention") \
                from None

    def __call__(self, ids: list[int]) -> np.ndarray:
        (probs,) = self.session.run([OUTPUT], {INPUT: np.asarray(ids, np.int64)})
        assert probs.shape[-2:] == (len(ids), len(ids)), f"attention {probs.shape} for {len(ids)} tokens"
        return probs


def attention_maps(graph: AttentionGraph, tokenizer: Tokenizer, ids: list[int]) -> AttentionMaps:
    return AttentionMaps(list(ids), [token_text(tokenizer, t) for t in ids], graph(ids))


def token_text(tokenizer: Tokenizer, token: int) -> str:
    text = tokenizer.decode([token])
    return tokenizer.id_to_token(token) if "\ufffd" in text else text
