"""lm-evaluation-harness through the server: the real `lm_eval` command, `local-completions` against a real
`gpt2-onnx serve` process (remote tokenizer mode: the server's /tokenize and /tokenizer_info), gives the
same per-document log-likelihoods as the harness's own PyTorch backend (`hf`) on the same checkpoint.

The tasks (tests/data/lm_eval) are offline JSON tasks: rolling log-likelihood of whole documents (each fits
the context, so both backends score it in one window) and the log-likelihood of each multiple-choice answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, make_checkpoint
from .test_playground import served

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'gpt2-onnx[eval]'")
pytestmark = pytest.mark.slow

TASKS = REPO / "tests" / "data" / "lm_eval"
CONTEXT = 256


def lm_eval(out: Path, model: str, model_args: str, *extra: str) -> dict[str, list]:
    """Run the harness's CLI from the repo root; each task's per-document responses, in document order."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
               "--tasks", "gpt2onnx_rolling,gpt2onnx_choice", "--include_path", str(TASKS), "--batch_size", "1",
               "--output_path", str(out), "--log_samples", *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {}
    for task in ("gpt2onnx_rolling", "gpt2onnx_choice"):
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        rows = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])
        samples[task] = [numbers(row["resps"]) for row in rows]
    return samples


def numbers(value) -> list[float]:
    """The log-likelihoods in a sample's responses (logged as strings), flattened; is-greedy flags dropped."""
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in numbers(v)]
    if isinstance(value, bool) or str(value) in ("True", "False"):
        return []
    return [float(value)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-eval", n_positions=CONTEXT)


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory) -> Path:
    from gpt2_onnx.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny-eval"
    export_model(str(checkpoint), out, log=lambda _: None)
    return out


def test_documents_fit_the_context(checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for line in (TASKS / "documents.jsonl").read_text().splitlines():
        assert len(tokenizer(json.loads(line)["text"])["input_ids"]) < CONTEXT - 1


def test_local_completions_match_the_hf_backend(checkpoint, export, tmp_path):
    with served(export) as url:
        ours = lm_eval(tmp_path / "server", "local-completions",
                       f"model=tiny-eval,base_url={url}/v1/completions,tokenizer_backend=remote,"
                       f"max_length={CONTEXT},num_concurrent=1,max_retries=1")
    theirs = lm_eval(tmp_path / "hf", "hf", f"pretrained={checkpoint},dtype=float32", "--device", "cpu")
    for task in ours:
        assert len(ours[task]) == len(theirs[task]) > 0
        for doc, (a, b) in enumerate(zip(ours[task], theirs[task])):
            assert len(a) == len(b) > 0, (task, doc, a, b)
            assert max(abs(x - y) for x, y in zip(a, b)) < 2e-4, (task, doc, a, b)
