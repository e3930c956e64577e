"""Attention maps: the inspection graph's probabilities equal PyTorch's `output_attentions=True`, the export
writes it only on request (and records it), and `gpt2-onnx attention` draws them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2_onnx.cli import main
from gpt2_onnx.engine import Engine, Manifest
from gpt2_onnx.errors import Gpt2OnnxError

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hi", "Übermäßig schöne Grüße 🚀\n\nand more"]


@pytest.fixture(scope="module")
def attention_export(tiny_checkpoint, tmp_path_factory):
    from gpt2_onnx.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny-attention"
    export_model(str(tiny_checkpoint), out, with_attention=True, log=lambda _: None)
    return out


def torch_attentions(checkpoint, ids: list[int]) -> np.ndarray:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        return torch.stack(model(torch.tensor([ids]), output_attentions=True).attentions)[:, 0].numpy()


@pytest.mark.parametrize("prompt", PROMPTS, ids=["sentence", "two-tokens", "unicode"])
def test_attention_matches_torch_output_attentions(attention_export, tiny_checkpoint, prompt):
    maps = Engine(attention_export, threads=1).attention(prompt)
    expected = torch_attentions(tiny_checkpoint, maps.token_ids)
    assert maps.probs.shape == expected.shape == (2, 4, len(maps.token_ids), len(maps.token_ids))
    np.testing.assert_allclose(maps.probs, expected, atol=1e-4)
    np.testing.assert_allclose(maps.probs.sum(-1), 1.0, atol=1e-5)
    assert len(maps.tokens) == len(maps.token_ids)
    if prompt.isascii():
        assert "".join(maps.tokens) == prompt


def test_attention_graph_is_recorded_and_the_fast_graph_unchanged(attention_export, tiny_export):
    import onnx

    manifest = Manifest.read(attention_export)
    assert "attention.onnx" in manifest.files and manifest.verify(attention_export) == []
    assert manifest.files["model.onnx"] == Manifest.read(tiny_export).files["model.onnx"]
    fast = onnx.load(str(attention_export / "model.onnx"), load_external_data=False)
    assert "attentions" not in {o.name for o in fast.graph.output}
    assert "attention.onnx" not in Manifest.read(tiny_export).files


def test_an_export_without_the_graph_says_how_to_get_it(tiny_engine):
    with pytest.raises(Gpt2OnnxError, match="--with-attention"):
        tiny_engine.attention("Hello")


def test_cli_draws_the_grid_and_one_head(attention_export, tmp_path, capsys):
    grid, one = tmp_path / "grid.png", tmp_path / "one.png"
    assert main(["attention", str(attention_export), "The cat sat on the mat", "--out", str(grid)]) == 0
    assert main(["attention", str(attention_export), "The cat sat", "--layer", "1", "--head", "3",
                 "--out", str(one)]) == 0
    assert grid.read_bytes()[:8] == one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 layers x 4 heads" in capsys.readouterr().out
    assert main(["attention", str(attention_export), "Hi", "--layer", "5", "--out", str(one)]) == 2
    assert "this model has 2 layers" in capsys.readouterr().err


@pytest.mark.slow
def test_gpt2_shaped_attention_matches_torch_and_plots(tmp_path):
    """The real gpt2 shape (12 layers x 12 heads, 768 wide, random weights): arrays and the 12 x 12 grid."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_onnx.engine.attention import AttentionGraph, AttentionMaps
    from gpt2_onnx.export.attention import write_attention_graph
    from gpt2_onnx.export.load import gpt2_tokenizer
    from gpt2_onnx.plot_attention import plot_attention

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager")).eval()
    write_attention_graph(model, tmp_path)
    ids = gpt2_tokenizer()("The thing about love is that it never ends, and then it does.")["input_ids"]
    probs = AttentionGraph(tmp_path, threads=2)(ids)
    with torch.no_grad():
        expected = torch.stack(model(torch.tensor([ids]), output_attentions=True).attentions)[:, 0].numpy()
    assert probs.shape == (12, 12, len(ids), len(ids))
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    out = plot_attention(AttentionMaps(ids, [str(t) for t in ids], probs), tmp_path / "grid.png")
    assert out.stat().st_size > 10_000
