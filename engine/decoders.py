"""Decoders: one forward pass of the graph plus the KV cache it carries between steps.

Every decoder has the calls the generation loop uses:
    prefill(prompts, max_length) -> logits [B, V] at each prompt's last token
    decode(tokens [n]) -> logits [n, V] for the next position of the n rows now in the batch
    remove(row) -> the row leaves the batch; the last row takes its index (as list "swap-remove")
The logits returned by `decode` may be a buffer that the next call overwrites: copy them to keep them.
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from gpt2_onnx.errors import Gpt2OnnxError

from .hugepages import affordable
from .manifest import FAST_INPUTS, REFERENCE_INPUTS, Manifest


class ConcatCacheDecoder:
    """Optimum's graph: `past_key_values.{i}.key/value` [B, H, T, D] in, `present.{i}.*` [B, H, T+S, D] out.

    The graph itself concatenates the cache each step; we hand each `present` OrtValue back as the next
    `past` through IO binding, so nothing is copied through numpy. This is the reference path: prompts
    are prefilled together, left-padded, and rows cannot join a running batch.
    """

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, provider: str = "cpu") -> None:
        manifest.io.require(*REFERENCE_INPUTS)
        self.session, self.manifest, self.provider = session, manifest, provider
        self.cache_names, self.present_names = map(list, zip(*manifest.io.cache_names(manifest.n_layer)))
        self.past: list[ort.OrtValue] = []
        self.attention_mask = np.zeros((0, 0), np.int64)  # [B, T]: 0 for left padding
        self.next_position = np.zeros(0, np.int64)  # [B]

    def prefill(self, prompts: list[list[int]], max_length: int | None = None) -> np.ndarray:
        input_ids, self.attention_mask = left_pad(prompts, pad_id=self.manifest.eos_token_id)
        empty = np.zeros((len(prompts), self.manifest.n_head, 0, self.manifest.head_dim), self.manifest.io.kv_dtype)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty, self.provider, 0) for _ in self.cache_names]
        positions = np.maximum(np.cumsum(self.attention_mask, axis=1) - 1, 0)  # pads get position 0
        self.next_position = positions[:, -1] + 1
        return self._run(input_ids, positions)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        batch = tokens.shape[0]
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        return self._run(tokens.reshape(batch, 1).astype(np.int64), positions)

    def remove(self, row: int) -> None:
        order = np.arange(len(self.next_position) - 1)
        if row < len(order):
            order[row] = len(order)  # the last row moves into the hole
        self.attention_mask, self.next_position = self.attention_mask[order], self.next_position[order]
        self.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[order]), self.provider, 0)
                     for value in self.past]

    def _run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        inputs = (input_ids, self.attention_mask, np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(REFERENCE_INPUTS, inputs):
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.cache_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.manifest.io.logits, self.provider)
        for name in self.present_names:
            binding.bind_output(name, self.provider)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1:])
        return outputs[0].numpy()[:, -1, :]  # [B, S, V] -> last position


class SharedBufferDecoder:
    """The fast graph: one KV buffer per layer and kind, [capacity, H, T_max, D], allocated once and bound
    as both past and present, so GroupQueryAttention writes only each step's new row in place.

    Rows are slots: `add` prefills a prompt into the next free slot, `add_many` several prompts into the next
    free slots in one pass (a run of slots is a contiguous slice of the buffer, so it is bound by pointer),
    even while other rows are mid-generation. Decode steps run the first `rows` slots together with one
    `seqlens_k` per row; `remove` keeps the live rows packed at the front by moving the last row into the hole.

    With a `batched` session (the export's batched graph: same IO, same cache layout, another kernel),
    every pass of at least `min_tokens` tokens (a prompt's length, or the rows of a decode step) runs
    there instead: e.g. int4 MatMulNBits for one token at a time, int8 for prefills and wide batches.
    """

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, provider: str = "cpu",
                 batched: ort.InferenceSession | None = None, min_tokens: int | None = None,
                 huge_pages: bool = False) -> None:
        manifest.io.require(*FAST_INPUTS)
        self.session, self.manifest, self.provider = session, manifest, provider
        self.batched = batched
        self.min_tokens = min_tokens if batched is not None and min_tokens is not None else None
        self.names = manifest.io.cache_names(manifest.n_layer)  # (past, present) per layer and kind
        self.dtype = np.dtype(manifest.io.kv_dtype)  # fp16 graphs keep an fp16 cache
        self.huge_pages = huge_pages  # the KV buffer's default page size (see `zeroed`)
        self.on_huge_pages = False  # the page size of the buffer allocated last
        self.capacity = self.max_length = self.rows = 0

    def buffer_bytes(self, capacity: int, max_length: int) -> int:
        """The whole KV buffer for `capacity` rows of `max_length` tokens, every layer and kind."""
        return len(self.names) * capacity * max_length * self.manifest.n_embd * self.dtype.itemsize

    def allocate(self, capacity: int, max_length: int, huge_pages: bool | None = None) -> None:
        """Room for `capacity` rows of up to `max_length` tokens each (prompt + generated); on 2 MB pages if
        `huge_pages`, or when None if the decoder's default says so and the whole buffer is affordable (a row
        on them commits its full length at its first token: `zeroed`)."""
        shape = (capacity, self.manifest.n_head, max_length, self.manifest.head_dim)
        if huge_pages is None:
            huge_pages = self.huge_pages and affordable(self.buffer_bytes(capacity, max_length))
        on_huge_pages = self.provider == "cpu" and huge_pages
        if self.reusable(capacity, max_length, on_huge_pages):
            self.rows = 0  # the old rows' cache entries stay, past every new row's length: never read
            self.lengths[:] = 0
            return
        self.capacity = 0  # until the new buffer exists: a failed allocation leaves nothing to reuse
        if self.provider == "cpu":  # numpy owns the memory (zeroed lazily by the OS: pages are touched as used)
            self.arrays = [zeroed(shape, self.dtype, huge_pages) for _ in self.names]
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(array) for array in self.arrays]
        else:
            self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.provider, 0)
                            for _ in self.names]
        self.on_huge_pages = on_huge_pages
        self.capacity, self.max_length, self.rows = capacity, max_length, 0
        self.lengths = np.zeros(capacity, np.int64)  # tokens in each row's cache
        # decode inputs live in numpy arrays that the bound OrtValues share, updated in place each step
        self.step_ids = np.zeros((capacity, 1), np.int64)
        self.step_positions = np.zeros((capacity, 1), np.int64)
        self.step_seqlens = np.zeros(capacity, np.int32)
        self.step_total = np.zeros((), np.int32)
        self.step_logits = np.zeros((capacity, 1, self.manifest.vocab_size), np.float32)
        # one (graph, binding) per batch size, made when first needed
        self.step_bindings: dict[int, tuple[ort.InferenceSession, ort.IOBinding]] = {}
        # a prompt's binding per (graph, rows, first row), its cache views bound once; see `_prompt_binding`
        self.prompt_bindings: dict[tuple[int, int, int], ort.IOBinding] = {}

    def reusable(self, capacity: int, max_length: int, on_huge_pages: bool) -> bool:
        """Whether the buffer allocated last serves `capacity` rows of `max_length` tokens as it is: the same
        rows and pages, long enough, and at most REUSE_SLACK times as long. Reusing it skips zeroing and
        faulting in a new one and binding it again (gpt2 int4, 2 threads, a 32-token prompt after 0.3 s idle,
        16 alternating rounds: first token 23.6 against 25.4 ms with a 160-token buffer, 23.3 against 28.3 with
        a 1,024-token one on 2 MB pages). GroupQueryAttention reads each row only up to its length
        (`seqlens_k`), so what earlier rows left is never read, as when a server's freed row takes a new prompt."""
        return (self.capacity == capacity and max_length <= self.max_length <= REUSE_SLACK * max_length
                and self.on_huge_pages == on_huge_pages)

    def commit(self) -> None:
        """Fault in the whole host KV buffer now (a server's start) rather than in the first requests: on 2 MB
        pages a row's first token commits its full length, which made a cold gpt2 server's first 32 requests
        take 2.0-3.6 s instead of 0.7."""
        if self.provider == "cpu":
            for array in self.arrays:
                array.reshape(-1)[::mmap.PAGESIZE // self.dtype.itemsize] = 0  # a write per page

    def session_for(self, tokens: int) -> ort.InferenceSession:
        """The graph for a pass over `tokens` tokens in all."""
        if self.min_tokens is not None and tokens >= self.min_tokens:
            return self.batched
        return self.session

    def prefill(self, prompts: list[list[int]], max_length: int | None = None) -> np.ndarray:
        self.allocate(len(prompts), max_length or self.manifest.n_positions)
        groups = prefill_groups([len(prompt) for prompt in prompts])
        return np.concatenate([self.add_many([prompts[i] for i in group]) for group in groups])

    def add(self, prompt: list[int], all_logits: bool = False) -> np.ndarray:
        """Prefill `prompt` into the next free row; logits [S, V] at every position, or [1, V] at the last."""
        wanted = np.arange(len(prompt), dtype=np.int64) if all_logits else np.array([len(prompt) - 1], np.int64)
        return self._prefill([prompt], wanted)[0]

    def add_many(self, prompts: list[list[int]]) -> np.ndarray:
        """Prefill several prompts into the next free rows in one pass; logits [k, V] at each last token."""
        last_positions = np.array([len(p) - 1 for p in prompts], np.int64)
        wanted = np.unique(last_positions)  # the LM head runs at each distinct last position, for every row
        logits = self._prefill(prompts, wanted)
        return logits[np.arange(len(prompts)), np.searchsorted(wanted, last_positions)]

    def _prefill(self, prompts: list[list[int]], wanted: np.ndarray) -> np.ndarray:
        """One pass over `prompts` into the next free rows; logits [k, len(wanted), V] at positions `wanted`.

        Prompts of several lengths are padded on the right to the longest: GroupQueryAttention takes each
        row's length from `seqlens_k`, and the padding's cache entries lie past the row's length, where its
        decode steps write."""
        k, width = len(prompts), max(len(p) for p in prompts)
        if self.rows + k > self.capacity or width > self.max_length:
            raise Gpt2OnnxError(f"no room for {k} prompt(s) of up to {width} tokens: {self.rows} of "
                                f"{self.capacity} rows in use, {self.max_length} tokens each")
        lengths = np.array([len(p) for p in prompts], np.int64)
        ids = np.zeros((k, width), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = prompt
        logits = np.zeros((k, len(wanted), self.manifest.vocab_size), np.float32)
        inputs = [ids, np.broadcast_to(np.arange(width, dtype=np.int64), (k, width)).copy(),
                  (lengths - 1).astype(np.int32), np.array(width, np.int32), wanted]
        session = self.session_for(k * width)
        binding = self._prompt_binding(session, k, self.rows)
        self._bind_io(binding, inputs, logits)  # every input and the logits, each pass: none left from the last
        session.run_with_iobinding(binding)
        self.lengths[self.rows:self.rows + k] = lengths
        self.rows += k
        return logits

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        n = self.rows
        self.step_ids[:n, 0] = tokens
        self.step_positions[:n, 0] = self.lengths[:n]
        self.lengths[:n] += 1
        if self.lengths[:n].max() > self.max_length:
            raise Gpt2OnnxError(f"a row outgrew its {self.max_length}-token KV buffer; allocate a longer one")
        self.step_seqlens[:n] = self.lengths[:n] - 1
        self.step_total[...] = self.lengths[:n].max()
        if n not in self.step_bindings:
            inputs = [self.step_ids[:n], self.step_positions[:n], self.step_seqlens[:n], self.step_total,
                      np.array([-1], np.int64)]
            session = self.session_for(n)
            self.step_bindings[n] = session, self._binding(session, n, 0, inputs, self.step_logits[:n])
        session, binding = self.step_bindings[n]
        session.run_with_iobinding(binding)
        return self.step_logits[:n, 0]

    def remove(self, row: int) -> None:
        last = self.rows - 1
        if row != last:
            self._move_row(last, row)
            self.lengths[row] = self.lengths[last]
        self.lengths[last] = 0
        self.rows -= 1

    def _move_row(self, source: int, target: int) -> None:
        """Copy the filled part of one row's KV cache over another's."""
        filled = int(self.lengths[source])
        if self.provider == "cpu":
            for array in self.arrays:
                array[target, :, :filled] = array[source, :, :filled]
            return
        for buffer in self.buffers:  # onnxruntime's Python API has no device-to-device copy: go through the host
            array = buffer.numpy()
            array[target, :, :filled] = array[source, :, :filled]
            buffer.update_inplace(array)

    def _prompt_binding(self, session: ort.InferenceSession, batch: int, first_row: int) -> ort.IOBinding:
        """A binding with the cache views of `batch` rows from `first_row` bound, kept for the next prompt into
        the same rows (gpt2: binding every layer's views again took ~0.48 ms of a ~16 ms prompt). At most
        MAX_PROMPT_BINDINGS are kept; past that (a server admitting into many different rows) the set starts
        afresh."""
        key = (session is self.batched, batch, first_row)
        if key not in self.prompt_bindings:
            if len(self.prompt_bindings) >= MAX_PROMPT_BINDINGS:
                self.prompt_bindings.clear()
            self.prompt_bindings[key] = self._cache_binding(session, batch, first_row)
        return self.prompt_bindings[key]

    def _binding(self, session: ort.InferenceSession, batch: int, first_row: int, inputs: list[np.ndarray],
                 logits: np.ndarray) -> ort.IOBinding:
        binding = self._cache_binding(session, batch, first_row)
        self._bind_io(binding, inputs, logits)
        return binding

    def _bind_io(self, binding: ort.IOBinding, inputs: list[np.ndarray], logits: np.ndarray) -> None:
        """The pass's inputs and its logits array; binding a name again replaces what it was bound to."""
        for name, value in zip(FAST_INPUTS, inputs):
            binding.bind_cpu_input(name, value)
        binding.bind_output(self.manifest.io.logits, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)

    def _cache_binding(self, session: ort.InferenceSession, batch: int, first_row: int) -> ort.IOBinding:
        """A binding of the cache of `batch` rows from `first_row`: each layer's past and present, in place."""
        binding = session.io_binding()
        shape = self.buffers[0].shape()
        row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        for (past, present), buffer in zip(self.names, self.buffers):
            view = dict(device_type=self.provider, device_id=0, element_type=self.dtype,
                        shape=[batch, *shape[1:]], buffer_ptr=buffer.data_ptr() + first_row * row_bytes)
            binding.bind_input(past, **view)
            binding.bind_output(present, **view)
        return binding


# One pass over prompts of k rows, padded to the longest, costs like k x longest tokens, plus k LM-head rows at
# every distinct last position; one pass instead of k saves k-1 reads of the weights and the per-run costs
# (gpt2 int8, 2 threads: 4 prompts of 32 tokens 52 -> 38 ms, 32 of 16 tokens 285 -> 157 ms; tiny model
# 12.8 -> 4.0 ms). So prompts go together while the waste stays within PADDING_SLACK of their real tokens
# (counting a wasted head row as one token), and a pass holds at most MAX_PASS_TOKENS, which bounds its
# activations and attention scores (~rows x 12 heads x width^2 floats).
PADDING_SLACK = 0.25
MAX_PASS_TOKENS = 2048
MAX_PROMPT_BINDINGS = 64


def prefill_groups(lengths: list[int]) -> list[range]:
    """Runs of consecutive prompts (by their lengths) to prefill in one pass each, in order."""
    groups, start = [], 0
    for end in range(1, len(lengths)):
        run = lengths[start:end + 1]
        waste = len(run) * max(run) - sum(run) + len(run) * (len(set(run)) - 1)
        if waste > PADDING_SLACK * sum(run) or len(run) * max(run) > MAX_PASS_TOKENS:
            groups.append(range(start, end))
            start = end
    return groups + [range(start, len(lengths))] if lengths else []


HUGE_PAGES_FROM = 4 * 1024 * 1024  # bytes: smaller buffers come from numpy
REUSE_SLACK = 2  # a buffer up to this many times longer than asked for is reused rather than replaced


def zeroed(shape: tuple[int, ...], dtype: np.dtype, huge_pages: bool = False) -> np.ndarray:
    """A zeroed host array for the KV cache: a private anonymous mapping (Linux zeroes its pages lazily, as
    they are first written), on 2 MB pages if `huge_pages` and transparent huge pages are not `never`, else
    kept on 4 KB pages even where they are `always`. The array keeps the mapping alive.

    2 MB pages make attention cheaper (it reads each row's K and V every step; measured with gpt2 int8, 2
    threads: a 32-row step at contexts 40-168 took 29.4-31.4 ms against 32.9-35.2, one row at 700-960 tokens
    5.3-5.7 against 5.9-6.9), but a 2 MB page is whole once touched: a row of a [rows, heads, max_length,
    head_dim] buffer whose rows are longer than needed commits its full length at its first token (gpt2,
    1,024 positions: 72 MB a row against ~1 MB). So huge pages suit buffers sized to the work
    (`Engine.generate`), and a server's full-context buffer only where its whole size is affordable.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < HUGE_PAGES_FROM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shared: no fork sees it
    memory.madvise(mmap.MADV_HUGEPAGE if huge_pages else mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype).reshape(shape)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> input_ids [B, S] and attention_mask [B, S], padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), pad_id, np.int64)
    attention_mask = np.zeros((len(prompts), width), np.int64)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt):] = prompt
        attention_mask[b, width - len(prompt):] = 1
    return input_ids, attention_mask
