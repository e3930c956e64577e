"""transformers-style pipeline: same call, same result shape, the engine's tokens."""

from __future__ import annotations

import json

import pytest

import gpt2_onnx
from gpt2_onnx.errors import Gpt2OnnxError


def test_text_generation_pipeline_has_transformers_shape(tiny_export, tiny_engine):
    generator = gpt2_onnx.pipeline("text-generation", model=tiny_export)
    prompt = "The thing about love is "
    out = generator(prompt)
    # no task_specific_params in this config: transformers' defaults, greedy up to max_length=20
    expected = tiny_engine.generate(prompt, max_new_tokens=20 - len(tiny_engine.encode(prompt))).text
    assert out == [{"generated_text": prompt + expected}]
    assert generator(prompt, max_new_tokens=5, return_full_text=False) == \
           [{"generated_text": tiny_engine.generate(prompt, max_new_tokens=5).text}]
    many = generator(["a", "b"], max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=0)
    assert len(many) == 2 and all(len(choices) == 3 for choices in many)
    assert len({c["generated_text"] for c in many[0]}) > 1  # distinct samples


def test_pipeline_reads_the_models_task_defaults(tiny_export, tmp_path):
    import shutil

    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_export, folder)
    config = json.loads((folder / "config.json").read_text())
    config["task_specific_params"] = {"text-generation": {"do_sample": True, "max_length": 12}}
    (folder / "config.json").write_text(json.dumps(config))
    generator = gpt2_onnx.pipeline("text-generation", model=folder)
    assert generator.defaults["do_sample"] is True
    out = generator("Hello world", return_full_text=False)[0]["generated_text"]
    assert out and len(generator.engine.encode("Hello world" + out)) <= 14  # ~max_length, re-tokenised


def test_pipeline_errors_name_the_problem(tiny_export):
    with pytest.raises(Gpt2OnnxError, match="text-generation"):
        gpt2_onnx.pipeline("summarization", model=tiny_export)
    with pytest.raises(Gpt2OnnxError, match="num_beams"):
        gpt2_onnx.pipeline("text-generation", model=tiny_export)("hi", num_beams=4)


def test_server_needs_the_fast_graph(tiny_reference_export):
    from gpt2_onnx.engine import Engine
    from gpt2_onnx.engine.scheduler import Scheduler

    with pytest.raises(Gpt2OnnxError, match="fast graph"):
        Scheduler(Engine(tiny_reference_export))
