"""`gpt2_onnx.pipeline("text-generation", model=MODEL_DIR)`: transformers' text-generation pipeline, on the engine.

    generator = pipeline("text-generation", model="models/gpt2")
    generator("The thing about love is ")  # -> [{"generated_text": "The thing about love is ..."}]

Defaults follow transformers: the model's `task_specific_params["text-generation"]` when its config has
them (the hub's gpt2 says do_sample=True, max_length=50), else greedy with max_length=20. `max_length`
counts the prompt, `max_new_tokens` does not and wins when both are given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gpt2_onnx.engine import Engine, GenerationConfig
from gpt2_onnx.engine.config import user_options
from gpt2_onnx.errors import Gpt2OnnxError

# the engine's own options (max_new_tokens and stop have transformers' names and rules here)
GENERATE_OPTIONS = {"do_sample"} | {o.name for o in user_options()} - {"max_new_tokens", "stop"}


class TextGenerationPipeline:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        config = json.loads((engine.model_dir / "config.json").read_text())
        self.defaults = {"max_length": 20, "do_sample": False,
                         **config.get("task_specific_params", {}).get("text-generation", {})}

    def __call__(self, text_inputs: str | Sequence[str], *, return_full_text: bool = True,
                 num_return_sequences: int = 1, max_new_tokens: int | None = None, max_length: int | None = None,
                 stop_sequence: str | Sequence[str] | None = None, **generate_kwargs) -> list:
        unknown = set(generate_kwargs) - GENERATE_OPTIONS
        if unknown:
            raise Gpt2OnnxError(f"unsupported option(s) {', '.join(sorted(unknown))}; this pipeline takes "
                                f"{', '.join(sorted(GENERATE_OPTIONS | {'max_new_tokens', 'max_length'}))}")
        single = isinstance(text_inputs, str)
        answers = [self._one(text, return_full_text, num_return_sequences, max_new_tokens, max_length,
                             stop_sequence, generate_kwargs) for text in ([text_inputs] if single else text_inputs)]
        return answers[0] if single else answers

    def _one(self, text: str, full: bool, count: int, max_new_tokens: int | None, max_length: int | None,
             stop, options: dict) -> list[dict]:
        prompt_tokens = len(self.engine.encode(text))
        if max_new_tokens is None:
            max_new_tokens = (max_length or self.defaults["max_length"]) - prompt_tokens
        if max_new_tokens < 1:
            raise Gpt2OnnxError(f"the prompt has {prompt_tokens} tokens, as many as max_length allows; "
                                "pass max_new_tokens=N")
        settings = {**{k: v for k, v in self.defaults.items() if k in GENERATE_OPTIONS}, **options}
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        config = GenerationConfig.from_options(max_new_tokens=max_new_tokens, stop=stop, **settings)
        if count > 1 and not config.greedy and config.seed is not None:  # distinct seeds, distinct samples
            results = [self.engine.generate(text, replace(config, seed=config.seed + i)) for i in range(count)]
        else:
            results = self.engine.generate([text] * count, config)
        return [{"generated_text": (text if full else "") + r.text} for r in results]


def pipeline(task: str, model: str | Path, provider: str = "cpu", threads: int | None = None) -> TextGenerationPipeline:
    if task != "text-generation":
        raise Gpt2OnnxError(f"unsupported task {task!r}; gpt2-onnx offers 'text-generation'")
    return TextGenerationPipeline(Engine(model, provider=provider, threads=threads))
