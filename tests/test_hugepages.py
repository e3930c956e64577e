"""Weights on huge pages: which memory is touched, and that nothing but the page size changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from gpt2_onnx.engine.hugepages import (CHUNK, HUGE_PAGE, PAGE, anonymous_ranges, chunks, collapse_populated_memory,
                                        huge_pages_wanted, populated_spans)

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234   /usr/bin/python3.11
55d0c1000000-55d0c5000000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
7f0000800000-7f0001000000 rw-s 00000000 00:05 99     /dev/shm/shared
7f0001000000-7f0001400000 rw-p 00010000 08:01 777    /data/model.onnx.data
7f0001400000-7f0001600000 r--p 00000000 00:00 0
7f0001600000-7f0001a00000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
"""


def test_only_private_writable_anonymous_memory_and_the_heap_are_candidates():
    assert anonymous_ranges(MAPS) == [(0x55d0c1000000, 0x55d0c5000000), (0x7f0000000000, 0x7f0000800000),
                                      (0x7f0001600000, 0x7f0001a00000)]


def test_only_whole_huge_pages_with_every_page_present_are_collapsed():
    per_huge = HUGE_PAGE // PAGE
    start = 5 * HUGE_PAGE - 3 * PAGE  # 3 pages before the first 2 MB boundary
    present = np.ones(3 + 4 * per_huge + 7, bool)
    present[3 + per_huge + 100] = False  # the second huge page misses one page
    assert populated_spans(start, present) == [(5 * HUGE_PAGE, 6 * HUGE_PAGE), (7 * HUGE_PAGE, 9 * HUGE_PAGE)]
    assert populated_spans(start, present[:per_huge]) == []  # no whole huge page inside


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, HUGE_PAGE // PAGE - 1), holes=st.lists(st.integers(0, 6 * HUGE_PAGE // PAGE - 1), max_size=5),
       length=st.integers(0, 6 * HUGE_PAGE // PAGE))
def test_collapsed_spans_are_exactly_the_fully_present_huge_pages(offset, holes, length):
    start = 3 * HUGE_PAGE + offset * PAGE
    present = np.ones(length, bool)
    present[[h for h in holes if h < length]] = False
    spans = populated_spans(start, present)
    chosen = {page for lo, hi in spans for page in range(lo, hi, HUGE_PAGE)}
    for page in range(0, 12 * HUGE_PAGE, HUGE_PAGE):  # brute force over every huge page
        first = (page - start) // PAGE
        whole = 0 <= first and first + HUGE_PAGE // PAGE <= length and present[first:first + HUGE_PAGE // PAGE].all()
        assert (page in chosen) == whole
    assert all(hi < lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # runs are merged and ordered


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 8 * CHUNK), length=st.integers(0, 5 * CHUNK))
def test_chunks_tile_the_range_and_break_only_at_chunk_boundaries(start, length):
    pieces = chunks(start, start + length)
    assert [lo for lo, _ in pieces[1:]] == [hi for _, hi in pieces[:-1]]  # contiguous
    if length:
        assert pieces[0][0] == start and pieces[-1][1] == start + length
    assert all(lo < hi and hi - lo <= CHUNK and lo // CHUNK == (hi - 1) // CHUNK for lo, hi in pieces)


def test_the_environment_switches_it_off_unless_the_caller_says(monkeypatch):
    monkeypatch.delenv("GPT2_ONNX_HUGE_PAGES", raising=False)
    assert huge_pages_wanted(None)
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv("GPT2_ONNX_HUGE_PAGES", off)
        assert not huge_pages_wanted(None) and huge_pages_wanted(True)
    monkeypatch.setenv("GPT2_ONNX_HUGE_PAGES", "1")
    assert huge_pages_wanted(None) and not huge_pages_wanted(False)


def _anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _kernel_collapses() -> bool:
    """Probe the kernel itself (not the code under test): can a written, aligned 2 MB of anonymous memory be
    collapsed into a huge page here?"""
    try:
        if sys.platform != "linux" or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            return False
    except OSError:
        return False
    import ctypes
    import mmap

    memory = mmap.mmap(-1, 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # as malloc's memory
    array = np.frombuffer(memory, np.uint8)
    array[:] = 1
    start = -(-array.ctypes.data // HUGE_PAGE) * HUGE_PAGE
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        return libc.madvise(start, HUGE_PAGE, 25) == 0  # MADV_COLLAPSE
    finally:
        del array
        memory.close()


@pytest.mark.skipif(not _kernel_collapses(), reason="needs Linux 6.1+ with transparent huge pages not 'never'")
def test_a_sessions_weights_land_on_huge_pages_and_compute_the_same():
    """In a fresh process: in one with a history, malloc may put the weights in spans collapsed before."""
    check = f"import tests.test_hugepages as t; t.{_session_weights_collapse.__name__}()"
    done = subprocess.run([sys.executable, "-c", check],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _session_weights_collapse() -> None:
    k, n = 1024, 4096  # 16 MB of weights: onnxruntime repacks them into memory of its own
    weights = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    plain = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    expected = plain.run(None, {"x": x})[0]
    before = collapse_populated_memory()  # all that was present before the second session: the baseline
    huge_before = _anon_huge_kb()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])  # both stay alive
    assert collapse_populated_memory() - before >= 4 * HUGE_PAGE  # of the 8 its weights span
    assert _anon_huge_kb() - huge_before >= 4 * HUGE_PAGE // 1024
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)


def test_switched_off_the_engine_collapses_nothing(tiny_export, monkeypatch):
    from gpt2_onnx.engine import Engine

    calls = []
    monkeypatch.setattr("gpt2_onnx.engine.engine.collapse_populated_memory", lambda: calls.append(1) or 0)
    Engine(tiny_export, huge_pages=False)
    monkeypatch.setenv("GPT2_ONNX_HUGE_PAGES", "0")
    Engine(tiny_export)
    assert calls == []
    Engine(tiny_export, huge_pages=True)  # the argument wins over the environment
    monkeypatch.delenv("GPT2_ONNX_HUGE_PAGES")
    Engine(tiny_export)
    assert calls == [1, 1]


def test_engine_logits_do_not_depend_on_the_page_size(tiny_export):
    from gpt2_onnx.engine import Engine

    def prefill_and_step(engine: Engine) -> list[np.ndarray]:
        decoder = engine.new_decoder()
        first = decoder.prefill([[5, 6, 7]], 16).copy()
        return [first, decoder.decode(first.argmax(axis=-1)).copy()]

    plain, huge = (prefill_and_step(Engine(tiny_export, huge_pages=on)) for on in (False, True))
    for a, b in zip(plain, huge):
        np.testing.assert_array_equal(a, b)


def _fake_sysfs(tmp_path, enabled: str, pmd_size: int = HUGE_PAGE):
    (tmp_path / "enabled").write_text(enabled)
    (tmp_path / "hpage_pmd_size").write_text(f"{pmd_size}\n")
    return str(tmp_path)


@pytest.mark.parametrize("enabled, pmd_size", [("always madvise [never]\n", HUGE_PAGE),  # the administrator's no
                                               ("always [madvise] never\n", 512 * 1024 * 1024)])  # 64 KB-page arm64
def test_thp_off_or_other_page_sizes_leave_memory_alone(tmp_path, monkeypatch, enabled, pmd_size):
    from gpt2_onnx.engine import hugepages

    monkeypatch.setattr(hugepages, "THP_SYSFS", _fake_sysfs(tmp_path, enabled, pmd_size))
    monkeypatch.setattr(hugepages, "anonymous_ranges", lambda maps: pytest.fail("memory was scanned"))
    assert collapse_populated_memory() == 0


def test_an_unreadable_page_map_is_no_error(tmp_path, monkeypatch):
    from gpt2_onnx.engine import hugepages

    monkeypatch.setattr(hugepages, "THP_SYSFS", _fake_sysfs(tmp_path, "always [madvise] never\n"))
    real_open = hugepages.os.open

    def refuse(path, *args):
        if str(path).endswith("pagemap"):
            raise PermissionError(13, "denied", path)  # e.g. a sandbox without /proc/self/pagemap
        return real_open(path, *args)

    monkeypatch.setattr(hugepages.os, "open", refuse)
    assert collapse_populated_memory() == 0


# -- the KV buffers ---------------------------------------------------------------------------------

def _mapping_kb(address: int, field: str = "AnonHugePages:") -> int:
    """`field` of the mapping holding `address` (/proc/self/smaps), in kB."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == field:
            return int(fields[1])
    return 0


def _kernel_faults_huge() -> bool:
    """Probe the kernel itself: does written anonymous memory advised MADV_HUGEPAGE come on 2 MB pages here?"""
    import mmap

    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    memory = mmap.mmap(-1, 4 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    array = np.frombuffer(memory, np.uint8)
    array[::PAGE] = 1
    try:
        return _mapping_kb(array.ctypes.data) > 0
    finally:
        del array
        memory.close()


@pytest.mark.skipif(not _kernel_faults_huge(), reason="needs Linux with transparent huge pages not 'never'")
def test_kv_buffers_go_on_huge_pages_only_when_asked():
    from gpt2_onnx.engine.decoders import zeroed

    shape = (4, 12, 1024, 64)  # 12 MB
    huge, plain = zeroed(shape, np.dtype(np.float32), huge_pages=True), zeroed(shape, np.dtype(np.float32))
    for array in (huge, plain):
        array[:, :, :8] = 1.0  # every row and head: a few positions, as a batch of short rows
    assert _mapping_kb(huge.ctypes.data) >= 4 * HUGE_PAGE // 1024
    assert _mapping_kb(plain.ctypes.data) == 0  # even where the system default is 'always'
    assert huge.sum() == plain.sum() == 4 * 12 * 8 * 64


def test_generate_puts_its_kv_buffers_on_huge_pages_with_the_weights(tiny_export):
    from gpt2_onnx.engine import Engine

    assert Engine(tiny_export, huge_pages=True).new_decoder().huge_pages
    assert not Engine(tiny_export, huge_pages=False).new_decoder().huge_pages


@pytest.mark.parametrize("engine_huge, memory, setting, expected", [
    (True, 64 << 30, None, True),   # affordable: the whole buffer is a small share of memory
    (True, 1 << 20, None, False),   # a full-context buffer that would take over a quarter of memory
    (True, 0, None, False),         # memory unknown
    (False, 64 << 30, None, False),  # huge pages switched off for the engine
    (True, 1 << 20, True, True),    # the setting wins
    (True, 64 << 30, False, False),
])
def test_the_servers_kv_buffer_goes_on_huge_pages_only_where_affordable(tiny_export, monkeypatch, engine_huge,
                                                                        memory, setting, expected):
    from gpt2_onnx.engine import Engine, hugepages
    from gpt2_onnx.engine.scheduler import Scheduler, SchedulerConfig

    monkeypatch.setattr(hugepages, "memory_bytes", lambda: memory)
    sched = Scheduler(Engine(tiny_export, huge_pages=engine_huge), SchedulerConfig(max_batch=4, kv_huge_pages=setting))
    assert sched.kv_huge_pages is expected
    assert ("2 MB pages" in sched.kv_summary) is expected
    sched.stop()


def test_generates_kv_buffer_goes_on_huge_pages_only_where_affordable(tiny_export, monkeypatch):
    from gpt2_onnx.engine import Engine, hugepages

    decoder = Engine(tiny_export, huge_pages=True).new_decoder()
    monkeypatch.setattr(hugepages, "memory_bytes", lambda: 64 << 30)
    decoder.prefill([[1, 2, 3]], 64)
    assert decoder.on_huge_pages
    monkeypatch.setattr(hugepages, "memory_bytes", lambda: 4 * decoder.buffer_bytes(1, 64) - 1)
    decoder.prefill([[1, 2, 3]], 64)
    assert not decoder.on_huge_pages


@pytest.mark.parametrize("flag, expected", [("auto", None), ("on", True), ("off", False)])
def test_serve_passes_its_kv_page_choice_to_the_scheduler(tiny_export, monkeypatch, flag, expected):
    from gpt2_onnx import cli
    from gpt2_onnx.engine import Engine
    from gpt2_onnx.serve import app

    seen = []
    monkeypatch.setattr(app, "serve", lambda model_dir, config, **_: seen.append(config))
    monkeypatch.setattr(cli, "check_port_free", lambda host, port: None)
    assert not cli.main(["serve", str(tiny_export), "--kv-huge-pages", flag])
    assert seen[0].kv_huge_pages is expected
    if expected is not None:
        scheduler = app.create_app(Engine(tiny_export), seen[0]).app.state.scheduler
        assert scheduler.kv_huge_pages is expected


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_a_server_on_huge_pages_commits_its_kv_buffer_at_start(tiny_export):
    from gpt2_onnx.engine import Engine
    from gpt2_onnx.engine.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(Engine(tiny_export), SchedulerConfig(max_batch=256, kv_huge_pages=True))
    array = sched.batch.decoder.arrays[0]
    assert array.nbytes >= 4 * 1024 * 1024  # a mapping of its own (smaller buffers come from numpy)
    assert _mapping_kb(array.ctypes.data, "Rss:") * 1024 >= array.nbytes  # every page, before any request
    lazy = Scheduler(Engine(tiny_export), SchedulerConfig(max_batch=256, kv_huge_pages=False))
    assert _mapping_kb(lazy.batch.decoder.arrays[0].ctypes.data, "Rss:") == 0
    sched.stop(), lazy.stop()
