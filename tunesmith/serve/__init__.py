"""The OpenAI-compatible HTTP app over an inference engine (FastAPI): request models, validation, routes, SSE."""
