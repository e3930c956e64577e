"""The routes beside OpenAI's completions: vLLM's tokenizer endpoints, the manifest, attention maps, the playground.

    GET  /tokenizer_info   eos/bos tokens and context length (lm-evaluation-harness's remote tokenizer mode)
    POST /tokenize         {"prompt", "add_special_tokens"} -> {"tokens", "count", "max_model_len"}
    POST /detokenize       {"tokens"} -> {"prompt"}
    GET  /manifest         the export's gpt2_onnx.json (precision, parity, quality, files)
    POST /attention        {"prompt", "layer", "head"} -> one head's attention probabilities [S, S]
    GET  / (/playground)   the web playground: one static page, no build step, no CDN

The request and response shapes are vLLM's (`tokenize`, `detokenize`), which lm-evaluation-harness's
`RemoteTokenizer` reads; every input is bounded and every error is OpenAI's shape (`ApiError`).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt2_onnx.engine import Engine
from gpt2_onnx.errors import Gpt2OnnxError

from .openai_api import ApiError, check_model

STATIC = Path(__file__).parent / "static"
MAX_TOKENIZE_CHARS = 1_000_000  # a document to window for rolling log-likelihood may exceed the context
MAX_DETOKENIZE_TOKENS = 100_000
MAX_ATTENTION_TOKENS = 256  # one [S, S] map per answer: 65,536 numbers at most


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None


class TokenizeRequest(_Request):
    prompt: str = Field(max_length=MAX_TOKENIZE_CHARS)
    add_special_tokens: bool = True  # GPT-2's tokenizer adds none either way


class DetokenizeRequest(_Request):
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class AttentionRequest(_Request):
    prompt: str = Field(min_length=1, max_length=MAX_ATTENTION_TOKENS * 128)
    layer: int = Field(0, ge=0)
    head: int = Field(0, ge=0)


def add_extra_routes(app: FastAPI, engine: Engine, model_name: str) -> None:
    """Register the routes above on the server's app."""
    tokenizer, manifest = engine.tokenizer, engine.manifest

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        eos = tokenizer.id_to_token(manifest.eos_token_id)
        bos = tokenizer.id_to_token(manifest.bos_token_id) if manifest.bos_token_id is not None else None
        return {"tokenizer_class": "GPT2TokenizerFast", "eos_token": eos, "bos_token": bos, "pad_token": None,
                "eos_token_id": manifest.eos_token_id, "bos_token_id": manifest.bos_token_id,
                "vocab_size": manifest.vocab_size, "model_max_length": manifest.n_positions}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model, model_name)
        encoding = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": encoding.ids, "count": len(encoding.ids), "max_model_len": manifest.n_positions}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model, model_name)
        bad = [t for t in body.tokens if not 0 <= t < manifest.vocab_size]
        if bad:
            raise ApiError(400, f"tokens: {bad[0]} is not a token id of this model (ids are in "
                                f"[0, {manifest.vocab_size}))", "tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens, skip_special_tokens=False)}

    @app.get("/manifest")
    async def manifest_json() -> dict:
        return {"model": model_name, **asdict(manifest)}

    @app.post("/attention")
    async def attention(body: AttentionRequest) -> dict:
        check_model(body.model, model_name)
        if body.layer >= manifest.n_layer or body.head >= manifest.n_head:
            raise ApiError(400, f"layer must be in [0, {manifest.n_layer}) and head in [0, {manifest.n_head})",
                           "layer" if body.layer >= manifest.n_layer else "head")
        ids = tokenizer.encode(body.prompt).ids
        if not 0 < len(ids) <= min(MAX_ATTENTION_TOKENS, manifest.n_positions):
            raise ApiError(400, f"the prompt has {len(ids)} tokens; attention maps take 1 to "
                                f"{min(MAX_ATTENTION_TOKENS, manifest.n_positions)}", "prompt")
        try:
            maps = await asyncio.to_thread(engine.attention, ids)
        except Gpt2OnnxError as exc:
            raise ApiError(404, str(exc), code="attention_unavailable") from None
        return {"tokens": maps.tokens, "layer": body.layer, "head": body.head, "n_layer": manifest.n_layer,
                "n_head": manifest.n_head,
                "attention": [[round(float(p), 5) for p in row] for row in maps.probs[body.layer, body.head]]}

    @app.get("/", response_class=HTMLResponse)
    @app.get("/playground", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html())


@lru_cache(maxsize=1)
def playground_html() -> str:
    return (STATIC / "playground.html").read_text(encoding="utf-8")
