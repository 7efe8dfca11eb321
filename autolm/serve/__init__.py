"""`autolm serve`: an OpenAI-compatible server (FastAPI + uvicorn, the `serve` extra) over a batching engine."""

from .http import serve
from .router import create_app

__all__ = ["create_app", "serve"]
