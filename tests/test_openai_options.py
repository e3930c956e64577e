"""OpenAI's options (logit_bias, presence/frequency penalties, stop_token_ids, best_of, user, suffix), each
checked against a reference: transformers' logits processors, or OpenAI's formula written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from gpt2_onnx.cli import add_generation_options, generation_config
from gpt2_onnx.engine import Engine, GenerationConfig
from gpt2_onnx.engine.config import ConfigError
from gpt2_onnx.engine.sampling import apply_openai_penalties, choose_token, rank_by_mean_logprob
from gpt2_onnx.serve.app import ServerConfig, create_app

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def api(tiny_export):
    with TestClient(create_app(Engine(tiny_export, threads=1), ServerConfig())) as client:
        yield client


def torch_greedy(model, ids: list[int], steps: int, **kwargs) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=50256, **kwargs)
    return out[0, len(ids):].tolist()


def test_logit_bias_matches_transformers_sequence_bias(tiny_engine, tiny_torch_model):
    ids = tiny_engine.encode(PROMPT)
    plain = tiny_engine.generate(ids, max_new_tokens=6).token_ids
    bias = {plain[0]: -100.0, plain[2]: -3.5, 1000: 7.0}
    ours = tiny_engine.generate(ids, max_new_tokens=6, logit_bias=bias).token_ids
    theirs = torch_greedy(tiny_torch_model, ids, 6, sequence_bias={(t,): b for t, b in bias.items()})
    assert ours == theirs
    assert ours != plain


def test_logit_bias_plus_100_forces_a_token_when_sampling(tiny_engine):
    result = tiny_engine.generate(PROMPT, max_new_tokens=5, temperature=1.0, seed=3, logit_bias={"318": 100})
    assert result.token_ids == [318] * 5


def openai_penalised_greedy(model, ids: list[int], steps: int, presence: float, frequency: float) -> list[int]:
    """OpenAI's definition, written out: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c over new tokens."""
    ids, counts, new = list(ids), {}, []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        for token, count in counts.items():
            logits[token] -= count * frequency + presence
        token = int(np.argmax(logits))
        counts[token] = counts.get(token, 0) + 1
        ids.append(token)
        new.append(token)
    return new


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (2.0, 0.0), (0.7, 0.9), (-1.0, 0.0)],
                         ids=["frequency", "presence", "both", "negative-presence"])
def test_presence_and_frequency_penalties_match_openai_formula(tiny_engine, tiny_torch_model, presence, frequency):
    ids = tiny_engine.encode("A B A B A B")
    ours = tiny_engine.generate(ids, max_new_tokens=12, presence_penalty=presence, frequency_penalty=frequency)
    assert ours.token_ids == openai_penalised_greedy(tiny_torch_model, ids, 12, presence, frequency)


def test_penalties_change_a_repetitive_greedy_text(tiny_engine):
    plain = tiny_engine.generate("A B A B A B", max_new_tokens=12).token_ids
    penalised = tiny_engine.generate("A B A B A B", max_new_tokens=12, frequency_penalty=2.0).token_ids
    assert len(set(plain)) < len(set(penalised))


def test_apply_openai_penalties_matches_a_loop():
    rng = np.random.default_rng(0)
    logits, counts = rng.normal(size=50), rng.integers(0, 4, size=50)
    expected = logits.copy()
    for j in range(50):
        expected[j] -= counts[j] * 0.3 + (0.5 if counts[j] > 0 else 0.0)
    np.testing.assert_allclose(apply_openai_penalties(logits, counts, 0.5, 0.3), expected)


def test_plain_greedy_is_the_float64_argmax_and_refuses_non_finite_logits():
    rng, greedy = np.random.default_rng(0), GenerationConfig(do_sample=False)
    for _ in range(200):  # coarse values: many ties, where the first index must win as before
        logits = rng.integers(-3, 4, 1000).astype(np.float32)
        assert choose_token(logits, greedy, rng) == int(np.argmax(logits.astype(np.float64)))
    biased = GenerationConfig(do_sample=False, logit_bias={7: 100.0})
    assert choose_token(np.zeros(10, np.float32), biased, rng) == 7
    for bad in (np.nan, np.inf):
        for config in (greedy, GenerationConfig(temperature=0.7)):
            logits = np.zeros(10, np.float32)
            logits[3] = bad
            with pytest.raises(FloatingPointError, match="non-finite"):
                choose_token(logits, config, rng)
    with pytest.raises(FloatingPointError):
        choose_token(np.full(10, -np.inf, np.float32), greedy, rng)
    row = np.array([0, 5, 1, 4, 0], np.float32)  # min_tokens holds back tokens 1 and 3 (EOS, a stop id)
    for config in (greedy, GenerationConfig(do_sample=False, logit_bias={1: 9.0}), GenerationConfig(temperature=1.0)):
        assert {choose_token(row, config, rng, held_back=[1, 3]) for _ in range(20)} <= {0, 2, 4}
    assert choose_token(row, greedy, rng, held_back=[1, 3]) == 2
    assert row.tolist() == [0, 5, 1, 4, 0]  # the decoder's buffer is left as it was


def test_stop_token_ids_match_transformers_eos_list(tiny_engine, tiny_torch_model):
    ids = tiny_engine.encode(PROMPT)
    plain = tiny_engine.generate(ids, max_new_tokens=8).token_ids
    stop = plain[3]
    result = tiny_engine.generate(ids, max_new_tokens=8, stop_token_ids=[stop])
    theirs = torch_greedy(tiny_torch_model, ids, 8, eos_token_id=[50256, stop])
    assert result.token_ids == theirs == plain[: plain.index(stop) + 1]
    assert result.finish_reason == "stop"
    assert result.text == tiny_engine.tokenizer.decode(plain[: plain.index(stop)])  # the stop token is not text


def test_min_tokens_holds_back_stop_token_ids(tiny_engine, tiny_torch_model):
    ids = tiny_engine.encode(PROMPT)
    first = tiny_engine.generate(ids, max_new_tokens=1).token_ids[0]
    result = tiny_engine.generate(ids, max_new_tokens=4, min_new_tokens=2, stop_token_ids=[first])
    theirs = torch_greedy(tiny_torch_model, ids, 4, min_new_tokens=2, eos_token_id=[50256, first])
    assert result.token_ids[0] != first
    assert result.token_ids == theirs


def test_token_ids_outside_the_vocabulary_end_the_row_with_a_reason(tiny_engine):
    result = tiny_engine.generate(PROMPT, max_new_tokens=2, logit_bias={60000: 1.0})
    assert result.finish_reason == "error" and "vocabulary" in result.error


@pytest.mark.parametrize("options, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids")], ids=lambda v: str(v))
def test_config_rejects_out_of_range_options(options, field):
    with pytest.raises(ConfigError, match=field):
        GenerationConfig(**options)


def test_cli_flags_come_from_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_generation_options(parser)
    args = parser.parse_args(["--logit-bias", "50256=-100,13=2.5", "--stop-token-ids", "198,13",
                              "--presence-penalty", "0.5", "--frequency-penalty", "0.25"])
    config = generation_config(args)
    assert config.logit_bias == ((50256, -100.0), (13, 2.5)) and config.stop_token_ids == (198, 13)
    assert (config.presence_penalty, config.frequency_penalty) == (0.5, 0.25)


def test_rank_by_mean_logprob_matches_numpy():
    rng = np.random.default_rng(1)
    sequences = [list(rng.normal(-2, 1, size=rng.integers(1, 9))) for _ in range(12)]
    expected = np.argsort([-np.mean(s) for s in sequences], kind="stable").tolist()
    assert rank_by_mean_logprob(sequences) == expected
    assert rank_by_mean_logprob([[], [-1.0]]) == [1, 0]


def test_best_of_returns_the_n_best_by_mean_logprob(api):
    base = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    every = api.post("/v1/completions", json={**base, "n": 4, "logprobs": 0}).json()["choices"]
    means = [np.mean(c["logprobs"]["token_logprobs"]) for c in every]
    best = api.post("/v1/completions", json={**base, "n": 2, "best_of": 4}).json()
    assert [c["text"] for c in best["choices"]] == [every[i]["text"] for i in np.argsort(means)[::-1][:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])
    assert best["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in every)


def test_openai_options_reach_the_engine_through_the_api(api, tiny_engine):
    ids = tiny_engine.encode(PROMPT)
    expected = tiny_engine.generate(ids, max_new_tokens=6, logit_bias={318: 5.0}, presence_penalty=1.0,
                                    frequency_penalty=0.5)
    body = api.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0, "user": "someone",
                                             "logit_bias": {"318": 5.0}, "presence_penalty": 1.0,
                                             "frequency_penalty": 0.5}).json()
    assert body["choices"][0]["text"] == expected.text
    stop = expected.token_ids[2]
    body = api.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0,
                                             "logit_bias": {"318": 5.0}, "presence_penalty": 1.0,
                                             "frequency_penalty": 0.5, "stop_token_ids": [stop]}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("extra, param", [
    ({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"60000": 1}}, "logit_bias"),
    ({"stop_token_ids": [50257]}, "stop_token_ids"), ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"), ({"suffix": "x"}, "suffix"), ({"best_of": 17}, "best_of"),
    ({"user": "u" * 300}, "user")], ids=lambda v: str(v)[:40])
def test_bad_options_get_400_naming_the_field(api, extra, param):
    response = api.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
