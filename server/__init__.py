"""The PixelLLM REST service: `create_app(settings)` for tests and embedding, `run(host, port)` to serve."""

from .app import StartupError, create_app, run
from .settings import Settings

__all__ = ["Settings", "StartupError", "create_app", "run"]
