"""`autolm serve`: an OpenAI-compatible server (FastAPI + uvicorn, the `serve` extra) over a batching engine."""

from .http import create_app, serve

__all__ = ["create_app", "serve"]
