"""Next-token choice as pure functions on a row of logits, plus a seeded generator per row.

Order: OpenAI's `logit_bias`, then its presence and frequency penalties (on the tokens generated so far,
as OpenAI defines them), then transformers' logits processors: repetition penalty, temperature, top-k,
top-p. Temperature 0 (or do_sample=False) is argmax of the biased, penalised logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import GenerationConfig


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: list[tuple[int, float]]  # the most likely tokens at this position, best first


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray | None, penalty: float) -> np.ndarray:
    """HF semantics: a seen token's positive logit is divided by `penalty`, a negative one multiplied.
    `seen` is a [V] mask of the tokens in the prompt and the output so far."""
    if penalty == 1.0 or seen is None:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...] | None) -> np.ndarray:
    """OpenAI's `logit_bias`: each (token, bias) pair adds `bias` to that token's logit."""
    if not bias:
        return logits
    logits = logits.copy()
    tokens, values = zip(*bias)
    logits[list(tokens)] += np.asarray(values, logits.dtype)
    return logits


def apply_openai_penalties(logits: np.ndarray, counts: np.ndarray | None, presence: float,
                           frequency: float) -> np.ndarray:
    """OpenAI's definition: logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence, where
    `counts` [V] is how often each token was generated so far (the prompt does not count)."""
    if counts is None or (presence == 0.0 and frequency == 0.0):
        return logits
    return logits - counts * frequency - (counts > 0) * presence


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.size:
        return logits
    kth_largest = np.partition(logits, -k)[-k]
    return np.where(logits < kth_largest, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus sampling)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    # keep a token while the mass *before* it is below p, so the top token always survives
    keep_sorted = (np.cumsum(probs) - probs) < p
    keep = np.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return np.where(keep, logits, -np.inf)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()


def choose_token(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator,
                 seen: np.ndarray | None = None, counts: np.ndarray | None = None,
                 held_back: list[int] | None = None) -> int:
    """One row of logits [V] -> the next token id. `seen` [V] bool marks the prompt's and the new tokens
    (repetition penalty); `counts` [V] counts the new tokens (presence and frequency penalties);
    `held_back` tokens cannot be chosen (min_tokens: no end yet). `logits` is never written to."""
    adjusted = bool(config.logit_bias) or counts is not None or seen is not None or not config.greedy
    if adjusted:
        logits = apply_logit_bias(logits.astype(np.float64), config.logit_bias)
        logits = apply_openai_penalties(logits, counts, config.presence_penalty, config.frequency_penalty)
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if held_back:
            logits[held_back] = -np.inf  # (a copy by now)
    # else plain greedy: the argmax of the float32 row as it is; a 32-row server step on a tiny model spent
    # more on copying rows than on the model
    best = int(np.argmax(logits))  # a NaN anywhere is picked first, an inf is the max
    if held_back and not adjusted and best in held_back:  # plain greedy chose an end too early
        logits = logits.copy()
        logits[held_back] = -np.inf
        best = int(np.argmax(logits))
    if not np.isfinite(logits[best]):
        raise FloatingPointError("the model produced non-finite logits")
    if config.greedy:
        return best
    # float64 and bounded settings (config.py) keep logits / temperature finite, so softmax has no NaN
    logits = top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p)
    probs = softmax(logits)
    return int(rng.choice(probs.size, p=probs))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64 so that log-probabilities near 0 keep their digits."""
    x = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_logprobs(logits: np.ndarray, chosen: int, top: int) -> TokenLogprob:
    """The model's log-probability of `chosen` and its `top` most likely alternatives (OpenAI's `logprobs`)."""
    logprobs = log_softmax(logits)
    top = min(max(top, 0), logprobs.size)
    best = np.argpartition(-logprobs, top - 1)[:top] if top else np.zeros(0, np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(int(chosen), float(logprobs[chosen]), [(int(t), float(logprobs[t])) for t in best])


def rank_by_mean_logprob(logprobs: list[list[float]]) -> list[int]:
    """Indices of the sequences, best first, by the mean log-probability of their tokens (OpenAI's
    `best_of`); an empty sequence ranks last, ties keep their order."""
    means = [sum(lp) / len(lp) if lp else -np.inf for lp in logprobs]
    return sorted(range(len(means)), key=lambda i: -means[i])
