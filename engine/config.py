"""Generation settings and results: plain frozen dataclasses, validated once up front.

Each option of `GenerationConfig` is declared once, here, with its help text and its name in OpenAI's
completions API: the CLI's flags, the server's request schema and the pipeline's keywords are all made
from these declarations, and `GenerationConfig.from_options` is the one mapping from user options.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields

from gpt2_onnx.errors import Gpt2OnnxError

MIN_TEMPERATURE = 1e-4  # below this, sampling is argmax: the same token, without overflowing the softmax
MAX_TEMPERATURE = 100.0
PENALTY_RANGE = (0.01, 100.0)  # beyond these, logits overflow float32 or the penalty means nothing more
OPENAI_PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty, as OpenAI bounds them
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's: -100 bans a token, +100 all but forces it
MAX_TOKEN_LISTS = 1024  # entries of logit_bias / stop_token_ids
SAMPLING_SWITCHES = ("temperature", "top_k", "top_p")  # setting one (away from "off") turns sampling on


def option(default, help: str, kind: type, openai: str | None = None):
    """A user-facing option: its default, help text, value type and name in OpenAI's API (if exposed)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "kind": kind, "openai": openai})


def token_bias_list(text: str) -> tuple[tuple[int, float], ...]:
    """`50256=-100,13=2.5` (the CLI's form) -> ((50256, -100.0), (13, 2.5))."""
    try:
        return tuple((int(t), float(b)) for t, b in (item.split("=") for item in text.split(",") if item.strip()))
    except ValueError:
        raise ValueError(f"expected ID=BIAS[,ID=BIAS...], got {text!r}") from None


def token_id_list(text: str) -> tuple[int, ...]:
    """`50256,198` (the CLI's form) -> (50256, 198)."""
    return tuple(int(item) for item in text.split(",") if item.strip())


class ConfigError(Gpt2OnnxError):
    """A bad option; `option` names it (as the config field) so front ends can point at their own name."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"bad option {option}: {message}")
        self.option = option


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = option(64, "tokens to generate at most (0: only score the prompt)", int, "max_tokens")
    min_new_tokens: int = option(0, "EOS is ignored until this many tokens exist", int, "min_tokens")
    do_sample: bool = False  # greedy unless asked; `from_options` turns it on when a sampling switch is set
    temperature: float = option(1.0, "sampling temperature; 0 is greedy", float, "temperature")
    top_k: int = option(0, "sample among the k most likely tokens (0 = off)", int, "top_k")
    top_p: float = option(1.0, "sample among the most likely tokens whose probability reaches p (1 = off)", float,
                          "top_p")
    repetition_penalty: float = option(1.0, "divide (multiply) seen tokens' positive (negative) logits by this "
                                            "(1 = off)", float, "repetition_penalty")
    stop: tuple[str, ...] = option(tuple, "end when the text contains this string (not included); repeatable",
                                   str, "stop")
    seed: int | None = option(None, "random seed: same seed, same text", int, "seed")
    presence_penalty: float = option(0.0, "subtract this from the logit of every token already generated "
                                          "(OpenAI's; -2..2, 0 = off)", float, "presence_penalty")
    frequency_penalty: float = option(0.0, "subtract this times its count from the logit of every token already "
                                           "generated (OpenAI's; -2..2, 0 = off)", float, "frequency_penalty")
    logit_bias: tuple[tuple[int, float], ...] | None = option(
        None, "add BIAS to token ID's logit before sampling, as ID=BIAS[,ID=BIAS...] (-100 bans, 100 forces)",
        token_bias_list, "logit_bias")
    stop_token_ids: tuple[int, ...] | None = option(
        None, "end when one of these token ids is generated (not in the text), as ID[,ID...]",
        token_id_list, "stop_token_ids")

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "must be an integer >= 0"),
            ("min_new_tokens", _is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             "must be an integer in [0, max_new_tokens]"),
            ("temperature", _is_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
             f"must be in [0, {MAX_TEMPERATURE:g}]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "must be an integer >= 0 (0 turns it off)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", _is_number(self.repetition_penalty)
             and PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1],
             f"must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}] (1 turns it off)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            ("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "must be in [0, 2^63)"),
            *[(name, _is_number(getattr(self, name))
               and OPENAI_PENALTY_RANGE[0] <= getattr(self, name) <= OPENAI_PENALTY_RANGE[1],
               f"must be in [{OPENAI_PENALTY_RANGE[0]:g}, {OPENAI_PENALTY_RANGE[1]:g}] (0 turns it off)")
              for name in ("presence_penalty", "frequency_penalty")],
            ("logit_bias", len(self.logit_bias or ()) <= MAX_TOKEN_LISTS
             and all(_is_int(t) and t >= 0 and _is_number(b) and LOGIT_BIAS_RANGE[0] <= b <= LOGIT_BIAS_RANGE[1]
                     for t, b in self.logit_bias or ()),
             f"at most {MAX_TOKEN_LISTS} token ids >= 0, each biased by a number in "
             f"[{LOGIT_BIAS_RANGE[0]:g}, {LOGIT_BIAS_RANGE[1]:g}]"),
            ("stop_token_ids", len(self.stop_token_ids or ()) <= MAX_TOKEN_LISTS
             and all(_is_int(t) and t >= 0 for t in self.stop_token_ids or ()),
             f"at most {MAX_TOKEN_LISTS} token ids, each an integer >= 0"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(name, message)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the options exist in the model's vocabulary (known only once a model is)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias or ()]),
                          ("stop_token_ids", list(self.stop_token_ids or ()))):
            if ids and max(ids) >= vocab_size:
                raise ConfigError(name, f"token id {max(ids)} is not in the model's vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < MIN_TEMPERATURE

    @classmethod
    def from_options(cls, do_sample: bool | None = None, **options) -> GenerationConfig:
        """User options (None = not given) -> a config. Unless `do_sample` says otherwise, sampling is on
        when a temperature > 0, a top_k > 0 or a top_p < 1 is given, as the CLI and the pipeline expect."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise Gpt2OnnxError(f"unknown option(s) {', '.join(unknown)}; the options are "
                                f"{', '.join(f.name for f in fields(cls))}")
        if do_sample is None:
            off = {"temperature": 0, "top_k": 0, "top_p": 1.0}
            do_sample = any(given.get(name, off[name]) != off[name] for name in SAMPLING_SWITCHES)
        return cls(do_sample=do_sample, **given)


def user_options() -> list:
    """The fields that front ends expose (all but do_sample, which the switches imply)."""
    return [f for f in fields(GenerationConfig) if "help" in f.metadata]


def _bias_pairs(value) -> tuple[tuple[int, float], ...] | None:
    """OpenAI's {"50256": -100} (keys are strings in JSON), {50256: -100} or pairs -> sorted (id, bias) pairs."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = {int(t) if isinstance(t, str) else t: b for t, b in items}
    except (TypeError, ValueError):
        raise ConfigError("logit_bias", "must map token ids to biases, e.g. {\"50256\": -100}") from None
    return tuple(pairs.items()) or None


def _token_ids(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError("stop_token_ids", "must be a list of token ids")
    return tuple(value) or None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Timings:
    prefill_ms: float  # prompt forward pass, to the first token's logits
    per_token_ms: float  # mean decode step (0 when only one token was generated)
    total_ms: float


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the continuation only, without the prompt
    token_ids: list[int] = field(repr=False)  # the new tokens
    finish_reason: str  # "length", "eos", "stop" or "error"
    prompt_tokens: int
    timings: Timings
    logprobs: list | None = field(default=None, repr=False)  # TokenLogprob entries, when asked for
    error: str | None = None  # why the row ended, when finish_reason is "error"
