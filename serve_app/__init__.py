"""Ray Serve application for an exported model folder: ``serve run serve_app:app``."""

from serve_app.app import BuildError, app, build_app

__all__ = ["BuildError", "app", "build_app"]
