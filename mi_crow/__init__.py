"""mi_crow: mechanistic interpretability for language models with accelerated TopK sparse autoencoders."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__", "ping"]

try:
    __version__: str = version("mi_crow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def ping() -> str:
    """An installation check: returns ``"pong"`` once ``import mi_crow`` works."""
    return "pong"
