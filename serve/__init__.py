"""HTTP serving (the `serve` extra: fastapi, uvicorn): the OpenAI-compatible app over the engine's scheduler."""
