"""A Hugging Face GPT-2 folder as a GGUF file (f32), the format llama.cpp loads and llama-quantize quantizes.

Follows llama.cpp's own converter (`convert_hf_to_gguf.py`, class GPT2Model, and `_set_vocab_gpt2`), written
on the `gguf` package from PyPI so the suite needs nothing from the llama.cpp source tree: the same tensor
names (`blk.{i}.attn_qkv.weight`, ...), Conv1D weights transposed to [out, in], the head left out (tied:
llama.cpp reuses `token_embd`), and the BPE vocabulary with its merges from the folder's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError

# Hugging Face name (after "transformer.") -> GGUF name; {i} is the layer
TENSOR_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "h.{i}.ln_1.weight": "blk.{i}.attn_norm.weight",
    "h.{i}.ln_1.bias": "blk.{i}.attn_norm.bias",
    "h.{i}.attn.c_attn.weight": "blk.{i}.attn_qkv.weight",
    "h.{i}.attn.c_attn.bias": "blk.{i}.attn_qkv.bias",
    "h.{i}.attn.c_proj.weight": "blk.{i}.attn_output.weight",
    "h.{i}.attn.c_proj.bias": "blk.{i}.attn_output.bias",
    "h.{i}.ln_2.weight": "blk.{i}.ffn_norm.weight",
    "h.{i}.ln_2.bias": "blk.{i}.ffn_norm.bias",
    "h.{i}.mlp.c_fc.weight": "blk.{i}.ffn_up.weight",
    "h.{i}.mlp.c_fc.bias": "blk.{i}.ffn_up.bias",
    "h.{i}.mlp.c_proj.weight": "blk.{i}.ffn_down.weight",
    "h.{i}.mlp.c_proj.bias": "blk.{i}.ffn_down.bias",
}
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # stored [in, out]; GGUF rows are outputs
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GPT-2 graph uses the tanh GELU


def convert_to_gguf(checkpoint: Path, out: Path) -> Path:
    """Write `checkpoint` (a GPT-2 Hugging Face folder) to `out` as an f32 GGUF file; returns `out`."""
    import gguf

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    check_supported(config)
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name(Path(checkpoint).name)
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_vocab(writer, Path(checkpoint), config["vocab_size"])
    for name, array in gguf_tensors(checkpoint, config["n_layer"]).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def check_supported(config: dict) -> None:
    """Refuse what llama.cpp's GPT-2 graph would compute differently, rather than benchmark another model."""
    if config.get("model_type") != "gpt2":
        raise Gpt2OnnxError(f"model_type is {config.get('model_type')!r}: the GGUF converter handles GPT-2 only")
    if config.get("activation_function", "gelu_new") not in GELU_TANH:
        raise Gpt2OnnxError(f"activation {config['activation_function']!r}: llama.cpp's GPT-2 uses the tanh GELU "
                            f"({', '.join(GELU_TANH)}); leave llama.cpp out of --systems for this checkpoint")
    if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
        raise Gpt2OnnxError("this checkpoint scales attention differently from llama.cpp's GPT-2; "
                            "leave llama.cpp out of --systems for it")


def gguf_tensors(checkpoint: Path, n_layer: int) -> dict[str, np.ndarray]:
    """GGUF name -> f32 array, in the order llama.cpp's converter writes them."""
    import torch
    from transformers import GPT2LMHeadModel

    with torch.inference_mode():
        state = {k.removeprefix("transformer."): v.float().numpy()
                 for k, v in GPT2LMHeadModel.from_pretrained(checkpoint).state_dict().items()}
    out = {}
    for hf, name in TENSOR_NAMES.items():
        for i in range(n_layer) if "{i}" in hf else [None]:
            key = hf.format(i=i)
            if key not in state:
                raise Gpt2OnnxError(f"{checkpoint} has no tensor {key!r}: is it a GPT2LMHeadModel checkpoint?")
            array = state[key].T if key.endswith(CONV1D) else state[key]
            out[name.format(i=i)] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def add_vocab(writer, checkpoint: Path, vocab_size: int) -> None:
    """The byte-level BPE vocabulary ("gpt2" model, "gpt-2" pre-tokenizer), its token types and merges."""
    import gguf
    from tokenizers import Tokenizer

    if not (checkpoint / "tokenizer.json").exists():
        raise Gpt2OnnxError(f"{checkpoint} has no tokenizer.json: save the tokenizer with the model")
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(gguf.TokenType.UNUSED if i not in by_id else
                     gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
