"""OpenAI's completions API: the request schema, its checks, and the response and stream-chunk bodies.

Only the shape of the API lives here; `server.py` wires it to the scheduler.
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from gpt2_onnx.errors import Gpt2OnnxError

from .config import GenerationConfig
from .scheduler import Event, TokenLogprob

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # ours -> OpenAI's


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `user`: accepted, unused

    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # None = 1.0, as OpenAI; 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extension (vLLM's): -1 or 0 = off
    repetition_penalty: float | None = Field(None, gt=0)  # an extension: 1.0 = off
    min_tokens: int = Field(0, ge=0)  # an extension (vLLM's): EOS is ignored until this many tokens
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> ApiError | None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return ApiError(400, f"{name} is not supported; use repetition_penalty", name)
        if self.best_of not in (None, self.n):
            return ApiError(400, "best_of is not supported (only best_of == n)", "best_of")
        if self.suffix:
            return ApiError(400, "suffix (insertion) is not supported by GPT-2", "suffix")
        if self.min_tokens > (self.max_tokens if self.max_tokens is not None else 16):
            return ApiError(400, "min_tokens must be <= max_tokens", "min_tokens")
        if self.max_tokens == 0 and not self.echo:
            return ApiError(400, "max_tokens must be >= 1 unless echo is true", "max_tokens")
        return None

    def generation_config(self) -> GenerationConfig:
        temperature = 1.0 if self.temperature is None else self.temperature
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return GenerationConfig(
                max_new_tokens=max(1, self.max_tokens if self.max_tokens is not None else 16),
                min_new_tokens=self.min_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                top_k=max(0, self.top_k or 0), top_p=self.top_p or 1.0, repetition_penalty=self.repetition_penalty or 1.0,
                stop=tuple(s for s in stop if s), seed=self.seed)
        except Gpt2OnnxError as exc:
            raise ApiError(400, str(exc)) from None

    def prompts(self) -> list[str | list[int]]:
        """One or many prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return list(prompt)


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


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
