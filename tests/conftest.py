"""Fixtures: tiny random GPT-2 checkpoints (made here, no network) and their exports."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAINED = SHARED / "models" / "gpt2-tiny-trained"
EVAL_TEXT = SHARED / "eval" / "prose.txt"

# Wider-than-default init so logits are peaked: greedy choices are then far from ties, and
# token-for-token comparisons with PyTorch test the graph, not rounding noise.
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, initializer_range=0.2)


def graph_nodes(model_file: Path) -> list:
    """Every node of an ONNX file, those inside If branches too (the shortlisted LM head's)."""
    import onnx

    def walk(graph):
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g)
    return list(walk(onnx.load(str(model_file)).graph))


def nbits(nodes: list) -> dict[str, int]:
    """MatMulNBits node name -> its bits."""
    return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}


def make_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_onnx.export.load import gpt2_tokenizer

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides})).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_torch_model(tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    from gpt2_onnx.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_model(str(tiny_checkpoint), out, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def tiny_reference_export(tiny_checkpoint, tmp_path_factory) -> Path:
    from gpt2_onnx.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny-reference"
    export_model(str(tiny_checkpoint), out, graph="reference", log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_export):
    from gpt2_onnx.engine import Engine

    return Engine(tiny_export, threads=1)


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs onnxruntime-gpu and a CUDA device")


@pytest.fixture(scope="session")
def long_context_export(tmp_path_factory) -> Path:
    """A tiny model with GPT-2's 1,024-token context: long enough generations to disconnect from."""
    from gpt2_onnx.export import export_model

    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-1024", n_positions=1024)
    out = tmp_path_factory.mktemp("onnx") / "tiny-1024"
    export_model(str(checkpoint), out, log=lambda _: None)
    return out
