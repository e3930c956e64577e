"""Decoders: one forward pass of the graph plus the KV cache it carries between steps.

Every decoder has the same two calls, which the generation loop uses:
    prefill(input_ids [B, S], attention_mask [B, S]) -> logits [B, V] at each row's last prompt token
    decode(tokens [B]) -> logits [B, V] for the next position
Prompts are left-padded: row b's real tokens are the last sum(attention_mask[b]) of its S columns.
The logits returned by `decode` may be a buffer that the next call overwrites: copy them to keep them.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .session import ModelInfo


class ConcatCacheDecoder:
    """Optimum's graph: `past_key_values.{i}.key/value` [B, H, T, D] in, `present.{i}.*` [B, H, T+S, D] out.

    The graph itself concatenates the cache each step; we hand each `present` OrtValue back as the next
    `past` through IO binding, so nothing is copied through numpy. This is the reference path.
    """

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, device: str = "cpu") -> None:
        self.session, self.info, self.device = session, info, device
        self.cache_names = [f"past_key_values.{i}.{kv}" for i in range(info.n_layer) for kv in ("key", "value")]
        self.present_names = [name.replace("past_key_values", "present") for name in self.cache_names]
        self.past: list[ort.OrtValue] = []
        self.attention_mask = np.zeros((0, 0), np.int64)  # [B, T]: 0 for left padding
        self.next_position = np.zeros(0, np.int64)  # [B]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_length: int | None = None) -> np.ndarray:
        batch = input_ids.shape[0]
        empty = np.zeros((batch, self.info.n_head, 0, self.info.head_dim), np.float32)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.cache_names]
        self.attention_mask = attention_mask.astype(np.int64)
        positions = np.maximum(np.cumsum(self.attention_mask, axis=1) - 1, 0)  # pads get position 0
        self.next_position = positions[:, -1] + 1
        return self._run(input_ids.astype(np.int64), positions)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        batch = tokens.shape[0]
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        return self._run(tokens.reshape(batch, 1).astype(np.int64), positions)

    def _run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", self.attention_mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self.cache_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1:])
        return outputs[0].numpy()[:, -1, :]  # [B, S, V] -> last position


class SharedBufferDecoder:
    """The fast graph: one KV buffer per layer and kind, [B, H, T_max, D], allocated once per generation and
    bound as both past and present, so GroupQueryAttention writes only each step's new row in place.

    Prompts are prefilled one row at a time (each row's slice of the buffer is contiguous, so it is bound by
    pointer): no padding is computed, and a row can be (re)filled while the others are mid-generation.
    Decode steps run all rows together with one `seqlens_k` per row.
    """

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, device: str = "cpu") -> None:
        self.session, self.info, self.device = session, info, device
        self.names = [f"{i}.{kv}" for i in range(info.n_layer) for kv in ("key", "value")]
        self.buffers: list[ort.OrtValue] = []
        self.lengths = np.zeros(0, np.int64)  # [B] tokens in each row's cache

    def allocate(self, batch: int, max_length: int) -> None:
        shape = (batch, self.info.n_head, max_length, self.info.head_dim)
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0)
                        for _ in self.names]
        self.lengths = np.zeros(batch, np.int64)
        # decode inputs live in numpy arrays that the bound OrtValues share, updated in place each step
        self.step_ids = np.zeros((batch, 1), np.int64)
        self.step_positions = np.zeros((batch, 1), np.int64)
        self.step_seqlens = np.zeros(batch, np.int32)
        self.step_total = np.zeros((), np.int32)
        self.step_logits = np.zeros((batch, self.info.vocab_size), np.float32)
        self.step_binding = self._binding(batch, 0, [self.step_ids, self.step_positions, self.step_seqlens,
                                                     self.step_total], self.step_logits)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_length: int | None = None) -> np.ndarray:
        batch = input_ids.shape[0]
        self.allocate(batch, max_length or self.info.n_positions)
        return np.stack([self.prefill_row(b, input_ids[b][attention_mask[b].astype(bool)]) for b in range(batch)])

    def prefill_row(self, row: int, prompt: np.ndarray) -> np.ndarray:
        """Write `prompt`'s KV into row `row` (which starts empty) and return its last logits [V]."""
        length = len(prompt)
        logits = np.zeros((1, self.info.vocab_size), np.float32)
        inputs = [prompt.reshape(1, length).astype(np.int64), np.arange(length, dtype=np.int64).reshape(1, length),
                  np.array([length - 1], np.int32), np.array(length, np.int32)]
        self.session.run_with_iobinding(self._binding(1, row, inputs, logits))
        self.lengths[row] = length
        return logits[0]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        self.step_ids[:, 0] = tokens
        self.step_positions[:, 0] = self.lengths
        self.lengths += 1
        self.step_seqlens[:] = self.lengths - 1
        self.step_total[...] = self.lengths.max()
        self.session.run_with_iobinding(self.step_binding)
        return self.step_logits

    def _binding(self, batch: int, first_row: int, inputs: list[np.ndarray], logits: np.ndarray) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, value in zip(("input_ids", "position_ids", "seqlens_k", "total_sequence_length"), inputs):
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        shape = self.buffers[0].shape()
        row_bytes = int(np.prod(shape[1:])) * 4
        for name, buffer in zip(self.names, self.buffers):
            view = dict(device_type=self.device, device_id=0, element_type=np.float32,
                        shape=[batch, *shape[1:]], buffer_ptr=buffer.data_ptr() + first_row * row_bytes)
            binding.bind_input(f"past_key_values.{name}", **view)
            binding.bind_output(f"present.{name}", **view)
        return binding
