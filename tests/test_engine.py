"""The engine against PyTorch: greedy tokens, logits at every step, the KV cache, sampling, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2_onnx.engine import Engine, GenerationConfig
from gpt2_onnx.errors import Gpt2OnnxError

from .conftest import requires_cuda

PROMPTS = {
    "ascii": "The quick brown fox jumps over the lazy dog",
    "non-ascii": "Übermäßig schöne Grüße aus Köln — ça va? 東京では雨が降っている",
    "emoji": "I love pizza 🍕🍕 and rockets 🚀!",
    "one-token": "Hello",
    "long": " ".join(f"Sentence number {i} talks about topic {i * 7 % 13}." for i in range(7)),
    "code": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
}


def torch_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=model.config.eos_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_greedy_tokens_match_transformers_generate(tiny_engine, tiny_torch_model, prompt):
    ids = tiny_engine.encode(prompt)
    if prompt == PROMPTS["one-token"]:
        assert len(ids) == 1
    config = GenerationConfig(max_new_tokens=32, min_new_tokens=32)
    result = tiny_engine.generate(prompt, config)
    assert result.token_ids == torch_greedy(tiny_torch_model, ids, 32)
    assert result.finish_reason == "length" and result.prompt_tokens == len(ids)


def test_logits_match_torch_at_prefill_and_every_decode_step(tiny_engine, tiny_torch_model):
    ids = tiny_engine.encode(PROMPTS["ascii"])
    decoder = tiny_engine.new_decoder()
    onnx_logits = [decoder.prefill([ids], len(ids) + 16)[0]]
    sequence = list(ids)
    for _ in range(16):
        sequence.append(int(onnx_logits[-1].argmax()))
        onnx_logits.append(decoder.decode(np.array([sequence[-1]]))[0].copy())
    with torch.inference_mode():
        full = tiny_torch_model(torch.tensor([sequence])).logits[0].numpy()
    expected = full[len(ids) - 1:]  # the position of each prediction
    for step, (got, want) in enumerate(zip(onnx_logits, expected)):
        assert np.abs(got - want).max() <= 1e-4, f"step {step}: max |Δ| {np.abs(got - want).max():.2e}"


def test_kv_cache_decode_matches_full_recompute(tiny_engine):
    ids = tiny_engine.encode(PROMPTS["long"])
    cached = tiny_engine.new_decoder()
    cached.prefill([ids[:10]], len(ids))
    for position in range(10, len(ids)):
        step_logits = cached.decode(np.array([ids[position]]))[0]
        recomputed = tiny_engine.new_decoder().prefill([ids[: position + 1]])[0]
        np.testing.assert_allclose(step_logits, recomputed, atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_engine):
    sample = dict(max_new_tokens=24, min_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.95)
    first = tiny_engine.generate("Once upon a time", GenerationConfig(seed=7, **sample))
    again = tiny_engine.generate("Once upon a time", GenerationConfig(seed=7, **sample))
    others = {tuple(tiny_engine.generate("Once upon a time", GenerationConfig(seed=s, **sample)).token_ids)
              for s in (8, 9, 10)}
    assert first.token_ids == again.token_ids and first.text == again.text
    assert tuple(first.token_ids) not in others or len(others) > 1


def test_top_k_one_equals_greedy(tiny_engine):
    greedy = tiny_engine.generate("Once upon a time", max_new_tokens=20, min_new_tokens=20)
    top1 = tiny_engine.generate("Once upon a time", max_new_tokens=20, min_new_tokens=20, do_sample=True,
                                top_k=1, temperature=0.7, seed=3)
    assert top1.token_ids == greedy.token_ids


def test_repetition_penalty_matches_transformers(tiny_engine, tiny_torch_model):
    ids = tiny_engine.encode(PROMPTS["ascii"])
    got = tiny_engine.generate(ids, max_new_tokens=20, min_new_tokens=20, repetition_penalty=1.3)
    with torch.inference_mode():
        want = tiny_torch_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20,
                                         min_new_tokens=20, repetition_penalty=1.3,
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         pad_token_id=50256)[0, len(ids):].tolist()
    assert got.token_ids == want


def test_batch_matches_single(tiny_engine):
    prompts = [PROMPTS["ascii"], PROMPTS["one-token"], PROMPTS["emoji"]]
    config = GenerationConfig(max_new_tokens=16, min_new_tokens=16)
    batched = tiny_engine.generate(prompts, config)
    assert [r.token_ids for r in batched] == [tiny_engine.generate(p, config).token_ids for p in prompts]


def test_stop_string_ends_generation_and_is_cut(tiny_engine):
    full = tiny_engine.generate("Once upon a time", max_new_tokens=30, min_new_tokens=30)
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), full.text
    result = tiny_engine.generate("Once upon a time", max_new_tokens=30, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]


def test_stream_yields_the_same_text_as_generate(tiny_engine):
    config = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    pieces = list(tiny_engine.stream(PROMPTS["emoji"], config))
    # the joined pieces equal the final text, so no piece ended inside a character
    assert "".join(pieces) == tiny_engine.generate(PROMPTS["emoji"], config).text
    assert len(pieces) > 1


def test_stream_holds_back_partial_characters_and_stop_prefixes(tiny_engine):
    from gpt2_onnx.engine.detokenize import safe_end as _safe_end

    pizza = tiny_engine.encode("a🍕")
    assert len(pizza) > 2  # the emoji's bytes span several tokens
    partial = tiny_engine.tokenizer.decode(pizza[:-1])
    assert partial.endswith("\ufffd") and _safe_end(partial, ()) == 1
    assert _safe_end("hello wor", ("world",)) == len("hello ")
    assert _safe_end("hello", ("world",)) == len("hello")


def test_timings_are_reported(tiny_engine):
    result = tiny_engine.generate("Hello", max_new_tokens=8, min_new_tokens=8)
    assert result.timings.prefill_ms > 0 and result.timings.per_token_ms > 0
    assert result.timings.total_ms >= result.timings.prefill_ms


def test_prompt_longer_than_context_fails_before_any_work(tiny_engine):
    with pytest.raises(Gpt2OnnxError, match="exceeds the model's context of 128"):
        tiny_engine.generate([1] * 100, max_new_tokens=29)
    tiny_engine.generate([1] * 100, max_new_tokens=28)  # exactly fits


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-text", "empty-ids"])
def test_empty_prompt_is_refused(tiny_engine, prompt):
    with pytest.raises(Gpt2OnnxError, match="empty"):
        tiny_engine.generate(prompt)


def test_bad_config_is_refused():
    with pytest.raises(Gpt2OnnxError, match="top_p"):
        GenerationConfig(top_p=0)


def test_missing_or_corrupt_model_file_names_the_file(tiny_export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(Gpt2OnnxError, match=r"broken/model\.onnx"):
        Engine(broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(Gpt2OnnxError, match=r"broken/model\.onnx is missing"):
        Engine(broken)
    with pytest.raises(Gpt2OnnxError, match="does not exist"):
        Engine(tmp_path / "nowhere")


def test_cuda_provider_says_what_is_missing(tiny_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(Gpt2OnnxError, match="onnxruntime-gpu"):
        Engine(tiny_export, provider="cuda")


@requires_cuda
def test_cuda_keeps_the_kv_buffers_on_the_device_and_matches_cpu(tiny_export, tiny_engine):
    engine = Engine(tiny_export, provider="cuda")
    decoder = engine.new_decoder()
    decoder.allocate(capacity=2, max_length=64)
    assert decoder.buffers[0].device_name().lower() == "cuda"
    prompts = [PROMPTS["ascii"], PROMPTS["code"]]
    config = GenerationConfig(max_new_tokens=24)
    assert [r.token_ids for r in engine.generate(prompts, config)] == \
           [r.token_ids for r in tiny_engine.generate(prompts, config)]


def test_engine_and_scheduler_need_no_torch_transformers_or_http(tiny_export):
    code = f"""
import sys, threading
from gpt2_onnx.engine import Engine, GenerationConfig
from gpt2_onnx.engine.scheduler import Job, Scheduler
engine = Engine({str(tiny_export)!r}, threads=1)
engine.generate("Hello", max_new_tokens=4)
scheduler = Scheduler(engine)
scheduler.start()
done = threading.Event()
scheduler.submit([Job(engine.new_row("Hi", GenerationConfig(max_new_tokens=3)),
                      lambda event: event.finish_reason and done.set())])
assert done.wait(30)
scheduler.stop()
bad = [m for m in ('torch', 'transformers', 'optimum', 'fastapi', 'pydantic', 'starlette', 'uvicorn')
       if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_optimum_cli_folder_loads(tiny_checkpoint, tiny_engine, tmp_path):
    from optimum.exporters.onnx import main_export

    main_export(str(tiny_checkpoint), output=tmp_path / "optimum", task="text-generation-with-past",
                do_validation=False)
    engine = Engine(tmp_path / "optimum", threads=1)
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    assert engine.generate("Hello there", config).token_ids == tiny_engine.generate("Hello there", config).token_ids


def test_fast_graph_matches_reference_graph(tiny_engine, tiny_reference_export):
    reference = Engine(tiny_reference_export, threads=1)
    assert tiny_engine.manifest.graph == "fast" and reference.manifest.graph == "reference"
    config = GenerationConfig(max_new_tokens=24, min_new_tokens=24)
    prompts = list(PROMPTS.values())
    assert [r.token_ids for r in tiny_engine.generate(prompts, config)] == \
           [r.token_ids for r in reference.generate(prompts, config)]
    ids = [tiny_engine.encode(PROMPTS["code"])]
    fast, ref = tiny_engine.new_decoder(), reference.new_decoder()
    np.testing.assert_allclose(fast.prefill(ids), ref.prefill(ids), atol=1e-4)
    for token in (11, 262, 13):
        np.testing.assert_allclose(fast.decode(np.array([token])), ref.decode(np.array([token])), atol=1e-4)


def test_rows_leave_the_batch_and_match_generating_alone(tiny_engine):
    prompts = [PROMPTS["ascii"], PROMPTS["one-token"], PROMPTS["code"], PROMPTS["long"]]
    # different lengths per row: each row's stop string ends it at its own step
    alone = [tiny_engine.generate(p, GenerationConfig(max_new_tokens=20)) for p in prompts]
    stops = tuple(r.text[4 + 3 * i: 6 + 3 * i] for i, r in enumerate(alone) if len(r.text) > 12)
    config = GenerationConfig(max_new_tokens=20, stop=stops)
    batched = tiny_engine.generate(prompts, config)
    assert [r.token_ids for r in batched] == [tiny_engine.generate(p, config).token_ids for p in prompts]
    assert len({len(r.token_ids) for r in batched}) > 1  # rows really finished at different steps


def test_rows_join_and_leave_a_running_shared_buffer(tiny_engine):
    ids = [tiny_engine.encode(p) for p in (PROMPTS["ascii"], PROMPTS["code"], PROMPTS["long"])]
    decoder = tiny_engine.new_decoder()
    decoder.allocate(capacity=3, max_length=96)
    first = [decoder.add(ids[0])[-1].argmax(), decoder.add(ids[1])[-1].argmax()]
    decoder.decode(np.array(first))  # two rows mid-generation
    decoder.remove(0)  # row 1 moves to slot 0
    late = decoder.add(ids[2])[-1].argmax()  # joins while the other row is running
    got = decoder.decode(np.array([11, late])).copy()
    for prompt, row in ((ids[1] + [int(first[1]), 11], got[0]), (ids[2] + [int(late)], got[1])):
        np.testing.assert_allclose(row, tiny_engine.new_decoder().prefill([prompt])[0], atol=1e-4)


def test_prompts_prefilled_together_match_one_by_one(tiny_engine):
    """One pass over several prompts of different lengths (padded on the right), next to a running row and
    over slots that hold an earlier row's cache, gives each row the logits and cache of its own prefill."""
    running = tiny_engine.encode(PROMPTS["code"])
    prompts = [tiny_engine.encode(PROMPTS[name]) for name in ("ascii", "long", "one-token", "ascii")]
    tokens = np.array([5, 6, 7, 8, 9])
    got = []
    for together in (False, True):
        decoder = tiny_engine.new_decoder()
        decoder.allocate(capacity=5, max_length=96)
        for array in decoder.arrays:
            array[...] = 7.0  # what rows that left wrote
        decoder.add(running)
        first = decoder.add_many(prompts) if together else np.concatenate([decoder.add(p) for p in prompts])
        got.append([first] + [decoder.decode(tokens).copy() for _ in range(3)])
    for one_by_one, together in zip(*got):
        np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_prompt_bindings_are_kept_per_rows_rebound_every_pass_and_bounded(tiny_engine, monkeypatch):
    """A prompt's binding (its cache views) is kept for the next prompt into the same rows; every pass binds
    its own inputs and logits again, so prompts of other lengths into kept, cleared or new bindings give a fresh
    decoder's logits, and the kept set never grows past its bound."""
    from gpt2_onnx.engine import decoders

    monkeypatch.setattr(decoders, "MAX_PROMPT_BINDINGS", 2)
    prompts = [tiny_engine.encode(PROMPTS[name]) for name in ("long", "ascii", "one-token", "code")]
    decoder = tiny_engine.new_decoder()
    decoder.allocate(capacity=3, max_length=96)
    for round_ in range(2):
        for prompt in prompts:  # row 0 each time: one kept binding, other widths through it
            np.testing.assert_allclose(decoder.add(prompt)[-1], tiny_engine.new_decoder().prefill([prompt])[0],
                                       atol=1e-5)
            decoder.remove(0)
        kept = decoder.prompt_bindings[False, 1, 0]
        with pytest.raises(RuntimeError, match="out of data bounds"):  # a pass onnxruntime refuses, through it
            decoder.add([tiny_engine.manifest.vocab_size + 7] * 5)
        assert decoder.rows == 0  # nothing of it is counted; row 0 below is checked against a fresh prefill
        assert decoder.add(prompts[1]) is not None and decoder.prompt_bindings[False, 1, 0] is kept
        decoder.add(prompts[0])  # row 1
        last = decoder.add(prompts[3])[-1]  # row 2: a third binding, so the set is started afresh
        assert len(decoder.prompt_bindings) <= 2
        np.testing.assert_allclose(last, tiny_engine.new_decoder().prefill([prompts[3]])[0], atol=1e-5)
        got = decoder.decode(np.array([1, 2, 3])).copy()
        for row, (prompt, token) in enumerate(zip((prompts[1], prompts[0], prompts[3]), (1, 2, 3))):
            np.testing.assert_allclose(got[row], tiny_engine.new_decoder().prefill([prompt + [token]])[0], atol=1e-4)
        for _ in range(3):
            decoder.remove(0)


def test_a_pass_with_no_room_is_refused_before_any_work_and_changes_nothing(tiny_engine):
    decoder = tiny_engine.new_decoder()
    decoder.allocate(capacity=3, max_length=16)
    decoder.add([1, 2, 3])
    for prompts in ([[1, 2]] * 3, [[1] * 17, [1]]):  # more rows than are free; a prompt longer than a row
        with pytest.raises(Gpt2OnnxError, match="no room"):
            decoder.add_many(prompts)
        assert decoder.rows == 1 and decoder.lengths.tolist() == [3, 0, 0]


@given(st.lists(st.integers(1, 1024), max_size=40))
def test_prefill_groups_cover_the_prompts_in_order_within_their_bounds(lengths):
    from gpt2_onnx.engine.decoders import MAX_PASS_TOKENS, PADDING_SLACK, prefill_groups

    groups = prefill_groups(lengths)
    assert [i for group in groups for i in group] == list(range(len(lengths)))
    for group in groups:
        run = [lengths[i] for i in group]
        waste = len(run) * max(run) - sum(run) + len(run) * (len(set(run)) - 1)
        assert len(run) == 1 or (waste <= PADDING_SLACK * sum(run) and len(run) * max(run) <= MAX_PASS_TOKENS)
    assert len(prefill_groups([32] * 16)) == 1  # a burst of equal prompts: one pass


def test_prompt_logits_at_every_position_match_torch(tiny_engine, tiny_torch_model):
    ids = tiny_engine.encode(PROMPTS["long"])
    decoder = tiny_engine.new_decoder()
    decoder.allocate(capacity=1, max_length=len(ids))
    got = decoder.add(ids, all_logits=True)
    with torch.inference_mode():
        want = tiny_torch_model(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("shape", [(2, 3), (64, 12, 1024, 16)])  # under and over the huge-page size
def test_kv_buffers_start_zeroed_and_writable(shape):
    from gpt2_onnx.engine.decoders import zeroed

    array = zeroed(shape, np.dtype(np.float32))
    assert array.shape == shape and array.dtype == np.float32 and not array.any()
    array[...] = 1.0  # the cache is written in place
    assert array.sum() == np.prod(shape)


def test_a_buffer_is_reused_only_where_it_fits(tiny_engine):
    decoder = tiny_engine.new_decoder()
    decoder.allocate(capacity=2, max_length=64)
    first = decoder.arrays[0]
    decoder.add([1, 2, 3])
    decoder.allocate(capacity=2, max_length=40)  # fits, and at most twice as long as asked: reused, emptied
    assert decoder.arrays[0] is first and decoder.rows == 0 and not decoder.lengths.any()
    for capacity, max_length in ((2, 65), (2, 31), (3, 64)):  # too short, over twice as long, other rows
        decoder.allocate(capacity=capacity, max_length=max_length)
        assert decoder.arrays[0] is not first
        first = decoder.arrays[0]


def test_calls_reuse_the_last_calls_buffer_and_match_a_fresh_engine(tiny_export):
    """A call runs over the cache a longer earlier call left in the buffer (read only up to each row's
    length): its tokens and logits are a fresh engine's; a wide batch's buffer is not kept."""
    config = GenerationConfig(max_new_tokens=12)  # the ascii prompt's 9 tokens + 12: a buffer of 21 to 42 fits
    engine = Engine(tiny_export, threads=1)
    engine.generate([PROMPTS["long"], PROMPTS["code"]], GenerationConfig(max_new_tokens=40))
    engine.generate(PROMPTS["code"], GenerationConfig(max_new_tokens=10))  # leaves 1 row of 40 tokens
    kept = engine._spare
    assert kept is not None and (kept.capacity, kept.max_length) == (1, 40)
    buffer = kept.arrays[0]
    for array in kept.arrays:
        array[...] = np.nan  # every position the next call reads it writes first: any other read shows as NaN

    def with_logprobs(engine: Engine) -> list:
        row = engine.new_row(PROMPTS["ascii"], config, logprobs=3)
        list(engine.decode_steps([row]))
        return row.entries

    reused = with_logprobs(engine)
    assert engine._spare is kept and kept.arrays[0] is buffer  # the same memory, the code prompt's cache in it
    assert reused == with_logprobs(Engine(tiny_export, threads=1))
    engine.generate([PROMPTS["ascii"]] * 4, GenerationConfig(max_new_tokens=40))  # 4 rows of 49 > 128 tokens
    assert engine._spare is None


def test_calls_in_flight_never_share_a_decoder(tiny_export):
    engine = Engine(tiny_export, threads=1)
    config = GenerationConfig(max_new_tokens=8)
    engine.generate(PROMPTS["ascii"], config)  # leaves a decoder to reuse
    spare = engine._spare
    first = engine.new_row(PROMPTS["ascii"], config)
    steps = engine.decode_steps([first])
    next(steps)  # in flight: it took the spare
    assert engine._spare is None
    second = engine.new_row(PROMPTS["code"], config)
    list(engine.decode_steps([second]))  # runs whole on a decoder of its own, then leaves it as the spare
    assert engine._spare is not None and engine._spare is not spare
    list(steps)
    assert engine._spare is spare  # the first call's, given back last
    reference = Engine(tiny_export, threads=1)
    for row, prompt in ((first, PROMPTS["ascii"]), (second, PROMPTS["code"])):
        assert row.new_ids == reference.generate(prompt, config).token_ids


def test_a_buffer_over_its_share_of_memory_is_not_kept(tiny_export, monkeypatch):
    import gpt2_onnx.engine.engine as engine_module

    needed = Engine(tiny_export, threads=1).new_decoder().buffer_bytes(1, 9 + 8)  # the ascii prompt's 9 + 8
    for memory, kept in ((needed * engine_module.KEEP_SHARE - 1, False), (needed * engine_module.KEEP_SHARE, True)):
        monkeypatch.setattr(engine_module, "memory_bytes", lambda memory=memory: memory)
        engine = Engine(tiny_export, threads=1)
        engine.generate(PROMPTS["ascii"], GenerationConfig(max_new_tokens=8))
        assert (engine._spare is not None) == kept


def test_a_call_that_fails_midway_or_an_allocation_that_fails_leaves_the_next_call_right(tiny_export, monkeypatch):
    """Fault injection: a decode step that raises ends its call with the error, and the decoder it leaves
    (rows still in it) gives the next call exactly a fresh engine's tokens; an allocation that fails leaves
    no buffer that a later allocation could take for reusable."""
    from gpt2_onnx.engine import decoders

    config = GenerationConfig(max_new_tokens=10)
    engine = Engine(tiny_export, threads=1)
    prompts = [PROMPTS["code"], PROMPTS["ascii"]]
    calls = {"n": 0}
    decode = decoders.SharedBufferDecoder.decode

    def failing_third_step(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected onnxruntime failure")
        return decode(self, tokens)
    monkeypatch.setattr(decoders.SharedBufferDecoder, "decode", failing_third_step)
    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(prompts, config)
    monkeypatch.undo()
    left = engine._spare
    assert left is not None and left.rows == 2 and left.lengths.any()  # kept as the failure left it
    buffer = left.arrays[0]
    got = [r.token_ids for r in engine.generate(prompts, config)]
    assert left.arrays[0] is buffer  # the same rows and length: reused
    assert got == [r.token_ids for r in Engine(tiny_export, threads=1).generate(prompts, config)]

    decoder = engine.new_decoder()
    decoder.allocate(capacity=1, max_length=32)
    monkeypatch.setattr(decoders, "zeroed", lambda *a, **k: (_ for _ in ()).throw(MemoryError("injected")))
    with pytest.raises(MemoryError):
        decoder.allocate(capacity=1, max_length=64)
    monkeypatch.undo()
    assert not decoder.reusable(1, 32, decoder.on_huge_pages)  # the 32-token buffer is no longer claimed
