"""Load a GPT-2-family checkpoint from a hub id, a local folder or a `random:<preset>` spec.

`random:<preset>` builds the real config with random weights (fixed seed) and the real GPT-2
tokenizer shipped in `assets/`, so every feature and benchmark runs offline; latency and memory
are exactly those of the trained model of that shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_onnx.errors import Gpt2OnnxError, first_line

ASSETS = Path(__file__).parent / "assets"
RANDOM_SEED = 0

# The shapes of the released checkpoints (as nanoGPT's `config_args`), plus `tiny` for quick demos.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),  # 82M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=256),
}

ACCEPTED_FORMS = (
    "a hub id such as 'gpt2' or 'distilgpt2' (needs the network), a local Hugging Face checkpoint "
    "folder with config.json and weights, or 'random:<preset>' with preset one of "
    + ", ".join(PRESETS)
)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: Any  # transformers.GPT2LMHeadModel in eval mode, fp32
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    source: str  # what the user asked for
    kind: str  # "random", "local" or "hub"


def load_checkpoint(source: str) -> LoadedCheckpoint:
    """Resolve `source` and return the fp32 torch model and its tokenizer."""
    if source.startswith("random:"):
        return _load_random(source)
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(source, path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise Gpt2OnnxError(f"no such folder: {source!r}; expected {ACCEPTED_FORMS}")
    return _load_hub(source)


def _load_random(source: str) -> LoadedCheckpoint:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    preset = source.removeprefix("random:")
    if preset not in PRESETS:
        raise Gpt2OnnxError(f"unknown preset {preset!r} in {source!r}; choose one of {', '.join(PRESETS)}")
    config = GPT2Config(**PRESETS[preset])
    torch.manual_seed(RANDOM_SEED)
    model = GPT2LMHeadModel(config).eval()
    return LoadedCheckpoint(model, gpt2_tokenizer(), source, "random")


def gpt2_tokenizer() -> Any:
    """The real GPT-2 tokenizer from the shipped vocab.json / merges.txt."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(vocab_file=str(ASSETS / "vocab.json"), merges_file=str(ASSETS / "merges.txt"))


def _load_local(source: str, path: Path) -> LoadedCheckpoint:
    if not path.is_dir():
        raise Gpt2OnnxError(f"{source!r} is a file; expected {ACCEPTED_FORMS}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise Gpt2OnnxError(f"{path} has no config.json, so it is not a Hugging Face checkpoint; "
                            f"expected {ACCEPTED_FORMS}")
    _check_architecture(json.loads(config_file.read_text()), source)
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise Gpt2OnnxError(f"{path} has no weights (looked for {', '.join(WEIGHT_FILES)}); "
                            "save the model with model.save_pretrained(folder)")
    return _from_pretrained(str(path), source, "local")


def _load_hub(source: str) -> LoadedCheckpoint:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        raise Gpt2OnnxError(f"could not load {source!r} from the Hugging Face hub ({first_line(exc)}); "
                            f"expected {ACCEPTED_FORMS}") from None
    _check_architecture(config.to_dict(), source)
    return _from_pretrained(source, source, "hub")


def _from_pretrained(location: str, source: str, kind: str) -> LoadedCheckpoint:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(location, dtype="float32").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, use_fast=True)
    except (OSError, ValueError):
        tokenizer = gpt2_tokenizer()  # fine-tunes often ship without tokenizer files
    return LoadedCheckpoint(model, tokenizer, source, kind)


def _check_architecture(config: dict, source: str) -> None:
    if config.get("model_type") != "gpt2":
        raise Gpt2OnnxError(f"{source!r} is a {config.get('model_type')!r} model; only GPT-2-family "
                            "checkpoints (model_type 'gpt2') are supported")
