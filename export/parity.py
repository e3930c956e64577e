"""Parity at export: the ONNX model, run by the engine, against the PyTorch model it came from.

A fixed prompt is prefilled, then 8 greedy steps are decoded from each side's KV cache; at every step
the full logits rows are compared. Greedy tokens come from PyTorch so both sides see the same inputs.
"""

from __future__ import annotations

import numpy as np

PARITY_PROMPT = "In 1879, the small town of Ashford held its first fair. Visitors came from"
PARITY_STEPS = 8


def measure_parity(torch_model, engine, steps: int = PARITY_STEPS) -> dict:
    """`engine`: a gpt2_onnx Engine over the export to check."""
    import torch

    prompt = engine.encode(PARITY_PROMPT)
    decoder = engine.new_decoder()
    ids = np.array([prompt], np.int64)

    onnx_logits = decoder.prefill([prompt], len(prompt) + steps)[0]
    with torch.inference_mode():
        out = torch_model(torch.from_numpy(ids), use_cache=True)
        torch_logits = out.logits[0, -1].numpy()
        past = out.past_key_values
        diffs = [float(np.abs(onnx_logits - torch_logits).max())]
        tokens_match = True
        for _ in range(steps):
            token = int(torch_logits.argmax())
            tokens_match &= token == int(onnx_logits.argmax())
            out = torch_model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            torch_logits, past = out.logits[0, -1].numpy(), out.past_key_values
            onnx_logits = decoder.decode(np.array([token], np.int64))[0]
            diffs.append(float(np.abs(onnx_logits - torch_logits).max()))
    return {
        "prompt": PARITY_PROMPT,
        "prompt_tokens": len(prompt),
        "decode_steps": steps,
        "max_abs_logit_diff": max(diffs),
        "max_abs_logit_diff_prefill": diffs[0],
        "max_abs_logit_diff_decode": max(diffs[1:]),
        "greedy_tokens_match": bool(tokens_match),
    }
