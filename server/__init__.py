"""The PixelLLM REST service: `create_app(settings)` for tests and embedding, `run(host, port)` to serve."""

from .app import create_app, run
from .errors import StartupError
from .settings import Settings

__all__ = ["Settings", "StartupError", "create_app", "run"]
