"""Decoders: one forward pass of the graph plus the KV cache it carries between steps.

Every decoder has the same two calls, which the generation loop uses:
    prefill(input_ids [B, S], attention_mask [B, S]) -> logits [B, V] at each row's last prompt token
    decode(tokens [B]) -> logits [B, V] for the next position
Prompts are left-padded: row b's real tokens are the last sum(attention_mask[b]) of its S columns.
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

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
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
