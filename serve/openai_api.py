"""OpenAI's completions API: the request schema, its checks, and the response and stream-chunk bodies.

Only the shape of the API lives here; `app.py` wires it to the scheduler. The standard OpenAI fields are
declared below; the engine's extra sampling options (top_k, repetition_penalty, min_tokens, ...) are
added from `GenerationConfig`'s own declarations, so a new option reaches the API without an edit here.
"""

from __future__ import annotations

import itertools
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, create_model

from gpt2_onnx.engine.config import ConfigError, GenerationConfig, user_options
from gpt2_onnx.engine.sampling import TokenLogprob, rank_by_mean_logprob
from gpt2_onnx.engine.scheduler import Event

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's
DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 256
MAX_CHOICES = 16  # n and best_of


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _StandardRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of other servers are accepted and unused

    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # None = 1.0, as OpenAI; 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None
    user: str | None = Field(None, max_length=256)  # accepted, unused


# the engine's options that OpenAI's API lacks, as optional fields (vLLM names them the same way)
_EXTENSIONS = {f.metadata["openai"]: (f.metadata["kind"] | None, Field(None, description=f.metadata["help"]))
               for f in user_options() if f.metadata["openai"] and f.metadata["openai"] not in _StandardRequest.model_fields}
_OPENAI_NAME = {f.name: f.metadata["openai"] for f in user_options() if f.metadata["openai"]}


class CompletionRequest(create_model("_Completion", __base__=_StandardRequest, **_EXTENSIONS)):
    def unsupported(self) -> ApiError | None:
        if self.best_of is not None and self.best_of < self.n:
            return ApiError(400, f"best_of ({self.best_of}) must be >= n ({self.n})", "best_of")
        if self.stream and self.rows_per_prompt > self.n:
            return ApiError(400, "best_of > n cannot be streamed (the best are known only at the end); "
                                 "drop stream or best_of", "best_of")
        if self.suffix:
            return ApiError(400, "suffix (insertion) is not supported by GPT-2", "suffix")
        if self.max_tokens == 0 and not self.echo:
            return ApiError(400, "max_tokens must be >= 1 unless echo is true", "max_tokens")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            return ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} "
                                 "characters", "stop")
        return None

    @property
    def rows_per_prompt(self) -> int:
        """Rows generated per prompt: best_of of them when given, of which the n best are returned."""
        return max(self.best_of or 1, self.n)

    @property
    def row_logprobs(self) -> int | None:
        """Log-probabilities the rows record: best_of ranks by them even when the client asked for none."""
        return 0 if self.logprobs is None and self.rows_per_prompt > self.n else self.logprobs

    def best(self, choices: list[dict], logprobs: list[list[float]]) -> list[dict]:
        """best_of: per prompt, the n choices of highest mean token log-probability, indexed 0.. again."""
        if self.rows_per_prompt == self.n:
            return choices
        group, kept = self.rows_per_prompt, []
        for start in range(0, len(choices), group):
            order = rank_by_mean_logprob(logprobs[start:start + group])[: self.n]
            kept += [choices[start + k] for k in order]
        return [{**c, "index": i, "logprobs": None if self.logprobs is None else c["logprobs"]}
                for i, c in enumerate(kept)]

    def generation_config(self, vocab_size: int | None = None) -> GenerationConfig:
        """The one mapping from this request to the engine's config (OpenAI's defaults applied), its
        token ids checked against `vocab_size` when given."""
        values = {name: getattr(self, api) for name, api in _OPENAI_NAME.items()}
        values["max_new_tokens"] = DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        values["temperature"] = 1.0 if self.temperature is None else self.temperature  # OpenAI samples by default
        if values.get("top_k") == -1:
            values["top_k"] = 0  # vLLM's "off"
        try:
            config = GenerationConfig.from_options(**values)
            if vocab_size is not None:
                config.check_vocab(vocab_size)
            return config
        except ConfigError as exc:
            api = _OPENAI_NAME.get(exc.option, exc.option)
            raise ApiError(400, str(exc).replace(exc.option, api, 1), api) from None

    def prompts(self) -> list[str | list[int]]:
        """One or many prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return list(prompt)


def check_model(requested: str | None, served: str) -> None:
    """OpenAI's 404 for a model this server does not serve (absent means the served one)."""
    if requested not in (None, served):
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {served!r}", "model",
                       code="model_not_found")


_ID_PREFIX = uuid.uuid4().hex[:12]  # per process: replicas behind one proxy never collide
_ID_COUNTER = itertools.count()


def new_id() -> str:
    """Unique per server; a counter, not uuid4 per request (the OS entropy call is slow on some VMs)."""
    return f"cmpl-{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def logprobs_body(entries: list[TokenLogprob], decode, start_offset: int = 0) -> dict:
    """OpenAI's legacy `logprobs` object: tokens, token_logprobs, top_logprobs and text_offset."""
    tokens, offsets, offset = [], [], start_offset
    for entry in entries:
        text = decode([entry.token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {decode([t]): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def chunk_body(completion_id: str, model: str, event: Event, logprobs: dict | None) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": event.index, "text": event.text, "logprobs": logprobs,
                         "finish_reason": FINISH_REASONS.get(event.finish_reason)}]}


def completion_body(completion_id: str, model: str, choices: list[dict], prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
