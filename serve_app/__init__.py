"""Ray Serve application for an exported model folder: ``serve run serve_app:app``.

The names are loaded on first use, so that Serve's HTTP proxy can import
``serve_app.retry`` without torch and the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.app import BuildError, app, build_app

__all__ = ["BuildError", "app", "build_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        module = importlib.import_module("serve_app.app")
        # Importing the submodule binds ``serve_app.app`` to it: bind the builder function instead.
        names = {key: getattr(module, key) for key in __all__}
        globals().update(names)
        return names[name]
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
