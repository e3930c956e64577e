"""Generation settings and results: plain frozen dataclasses, validated once up front."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpt2_onnx.errors import Gpt2OnnxError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is ignored until this many tokens exist (benchmarks need fixed lengths)
    do_sample: bool = False  # greedy unless asked; temperature 0 also means greedy
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; HF semantics (divide positive logits, multiply negative)
    stop: tuple[str, ...] = ()  # generation ends when the text contains one of these (not included)
    seed: int | None = None  # same seed, same text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise Gpt2OnnxError(f"bad GenerationConfig: {message}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass(frozen=True)
class Timings:
    prefill_ms: float  # prompt forward pass, to the first token's logits
    per_token_ms: float  # mean decode step (0 when only one token was generated)
    total_ms: float


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the continuation only, without the prompt
    token_ids: list[int] = field(repr=False)  # the new tokens
    finish_reason: str  # "length", "eos" or "stop"
    prompt_tokens: int
    timings: Timings
