"""The Engine: one object to load an export, one call to generate (as CTranslate2's Generator).

    engine = Engine("models/gpt2")
    engine.generate("Hello", max_new_tokens=20)      # -> GenerationResult
    for piece in engine.stream("Hello"): ...           # text as it is generated

Both drive the one decode loop in loop.py; the continuous-batching scheduler drives the same loop.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from gpt2_onnx.errors import Gpt2OnnxError

from .attention import AttentionGraph, AttentionMaps, attention_maps
from .config import GenerationConfig, GenerationResult
from .decoders import ConcatCacheDecoder, SharedBufferDecoder
from .detokenize import IncrementalText
from .loop import Batch, Row
from .manifest import BATCHED_FOLDER, Manifest
from .hugepages import collapse_populated_memory, huge_pages_wanted, memory_bytes
from .session import create_session, load_tokenizer

Prompt = str | Sequence[int]
KEEP_SHARE = 64  # a call's KV buffer is kept for the next call only up to this fraction of memory


class ContextTooLong(Gpt2OnnxError):
    """The prompt and the tokens asked for do not fit the model's context."""


class Engine:
    def __init__(self, model_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                 manifest: Manifest | None = None, shares_cores: bool = False, huge_pages: bool | None = None) -> None:
        """`shares_cores`: other threads of this process need the cores between runs (a server's event loop):
        the session's workers then stop spinning when a run ends (session.py). Always so when the export has
        a batched graph, whose session shares the cores with the main one. `huge_pages`: the weights on 2 MB
        pages where Linux allows it (CPU; ~10 % off a decode step, hugepages.py), and the KV buffers that
        `generate` sizes to its rows (decoders.zeroed); False leaves the weights as loaded and the buffers on
        4 KB pages; None: as the environment's GPT2_ONNX_HUGE_PAGES says (0/false/no/off: off), else on."""
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            what = "is a file, not a folder" if self.model_dir.exists() else "does not exist"
            raise Gpt2OnnxError(f"model folder {self.model_dir} {what}; give the folder written by "
                                "`gpt2-onnx export SOURCE OUT_DIR`")
        self.manifest = manifest or Manifest.read(self.model_dir)  # the export's own, before it is written
        self.manifest.check_files(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.provider = provider
        self._seeds = np.random.default_rng()
        self._attention_graph: AttentionGraph | None = None  # loaded on first use (attention.onnx is optional)
        # the batched graph's int8 kernel (DynamicQuantizeMatMul) is a CPU kernel and its threshold was timed on
        # the CPU: on CUDA every pass runs on the main graph
        batched = self.manifest.batched if provider == "cpu" else {}
        self.session = create_session(self.model_dir, provider, threads, shares_cores=shares_cores or bool(batched))
        # always the fixed folder inside the export, whatever the manifest's text says: never a path from outside it
        self.batched_session = (create_session(self.model_dir / BATCHED_FOLDER, provider, threads, shares_cores=True)
                                if batched else None)
        self.huge_pages = provider == "cpu" and huge_pages_wanted(huge_pages)  # for the KV buffers too
        if self.huge_pages:
            collapse_populated_memory()  # once, both sessions' weights loaded
        self.batched_min_tokens = batched.get("min_tokens")  # another threshold: `batched_from`
        self._spare_lock = threading.Lock()
        self._spare: SharedBufferDecoder | None = None  # the last call's decoder and KV buffer, for the next
        self._keep_bytes = memory_bytes() // KEEP_SHARE  # once, not at every call's end (it reads the cgroup)

    # -- public API -------------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None,
                 **options) -> GenerationResult | list[GenerationResult]:
        """A prompt (text or token ids) -> one result; a list of prompts -> a list, decoded as one batch."""
        config = _config(config, options)
        single = _is_single(prompts)
        rows = [self.new_row(p, config) for p in ([prompts] if single else prompts)]
        started = time.perf_counter()
        for _ in self.decode_steps(rows):
            pass
        total_ms = (time.perf_counter() - started) * 1e3
        results = [row.result(total_ms) for row in rows]
        return results[0] if single else results

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **options) -> Iterator[str]:
        """Yield the continuation's text piece by piece, never splitting a character or a stop string."""
        row = self.new_row(prompt, _config(config, options))
        for _ in self.decode_steps([row]):
            if piece := row.unsent_text():
                yield piece
        if row.finish_reason == "error":
            raise Gpt2OnnxError(f"generation failed: {row.error}")

    def new_row(self, prompt: Prompt, config: GenerationConfig, seed_offset: int = 0, logprobs: int | None = None,
                score_prompt: bool = False) -> Row:
        """A prompt ready for the loop; rows of one seed sample alike unless given different offsets."""
        ids = self.encode(prompt)
        if len(ids) + config.max_new_tokens > self.manifest.n_positions:
            raise ContextTooLong(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the model's "
                f"context of {self.manifest.n_positions} tokens; shorten the prompt or lower max_new_tokens")
        # unseeded rows draw their seed from the engine's generator (OS entropy per row is slow on some VMs)
        seed = int(self._seeds.integers(2**63)) if config.seed is None else (config.seed + seed_offset) % 2**63
        return Row(ids, config, self.manifest.eos_token_id, np.random.default_rng(seed),
                   IncrementalText(self.tokenizer), logprobs=logprobs, score_prompt=score_prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise Gpt2OnnxError("the prompt is empty; give at least one token of text")
        if max(ids) >= self.manifest.vocab_size or min(ids) < 0:
            raise Gpt2OnnxError(f"token ids must be in [0, {self.manifest.vocab_size}); got {min(ids)}..{max(ids)}")
        return ids

    def batched_from(self, min_tokens: int | None) -> Engine:
        """This engine, same sessions, with passes of `min_tokens`+ tokens on the batched graph (None: none, so
        everything runs on the main graph; 1: all). To measure each graph on its own, or to override the
        threshold the export measured on another machine."""
        other = copy.copy(self)
        other.batched_min_tokens = min_tokens
        other._spare_lock, other._spare = threading.Lock(), None  # its decoders route passes by its threshold
        return other

    def new_decoder(self) -> ConcatCacheDecoder | SharedBufferDecoder:
        """A fresh KV cache over this engine's session, of the kind the manifest names."""
        if self.manifest.graph != "fast":
            return ConcatCacheDecoder(self.session, self.manifest, self.provider)
        return SharedBufferDecoder(self.session, self.manifest, self.provider, self.batched_session,
                                   self.batched_min_tokens, huge_pages=self.huge_pages)

    # -- the loop ---------------------------------------------------------------------------------

    def decode_steps(self, rows: list[Row]) -> Iterator[int]:
        """Prefill, then decode until every row has finished; yields the step number after each token.
        A finished row leaves the batch, so later steps run only the rows still generating."""
        decoder = self._take_decoder()
        try:
            batch = Batch(decoder)
            batch.start(rows, max(len(row.prompt) + max(row.config.max_new_tokens, 1) for row in rows))
            for step in itertools.count():
                yield step
                batch.drop_finished()
                if not batch.rows:
                    return
                batch.step()
        finally:
            self._keep_decoder(decoder)

    def _take_decoder(self) -> ConcatCacheDecoder | SharedBufferDecoder:
        """The previous call's decoder if one is kept (its buffer is reused when it fits: `reusable`), else a
        new one. Each call takes its own: calls from several threads never share a buffer."""
        with self._spare_lock:
            decoder, self._spare = self._spare, None
        return decoder or self.new_decoder()

    def _keep_decoder(self, decoder: ConcatCacheDecoder | SharedBufferDecoder) -> None:
        """Keep a finished call's decoder for the next one if its buffer is small: at most one row of the full
        context and at most 1/KEEP_SHARE of memory (on a 24 GB machine gpt2's 75 MB row and gpt2-large's 377 MB
        are kept, gpt2-xl's 629 MB is not), so a wide batch's or a big model's buffer is freed when its call returns."""
        if not isinstance(decoder, SharedBufferDecoder):
            return
        rows_fit = decoder.capacity * decoder.max_length <= self.manifest.n_positions
        if rows_fit and decoder.buffer_bytes(decoder.capacity, decoder.max_length) <= self._keep_bytes:
            with self._spare_lock:
                replaced, self._spare = self._spare, decoder
            del replaced  # a replaced buffer is freed outside the lock

    # -- inspection -------------------------------------------------------------------------------

    def attention(self, prompt: Prompt) -> AttentionMaps:
        """Every layer's and head's attention probabilities [layers, heads, S, S] over the prompt, from the
        export's inspection graph (`gpt2-onnx export ... --with-attention`), as PyTorch's output_attentions."""
        ids = self.encode(prompt)
        if len(ids) > self.manifest.n_positions:
            raise ContextTooLong(f"the prompt has {len(ids)} tokens; the model's context is "
                                 f"{self.manifest.n_positions}")
        if self._attention_graph is None:
            self._attention_graph = AttentionGraph(self.model_dir)
        return attention_maps(self._attention_graph, self.tokenizer, ids)


def _is_single(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, Sequence) and len(prompts) == 0:
        raise Gpt2OnnxError("the prompt list is empty; pass a string, a list of token ids, or a list of either")
    return isinstance(prompts, (Sequence, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompts)


def _config(config: GenerationConfig | None, options: dict) -> GenerationConfig:
    if config is not None and options:
        return replace(config, **options)
    return config or GenerationConfig(**options)
