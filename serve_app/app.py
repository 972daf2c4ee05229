"""Application builder: ``serve run serve_app:app [model_dir=PATH] [config=FILE]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from ray.serve import Application

from rayvit.errors import UserError
from rayvit.storage import is_uri
from serve_app.deployment import ImageClassifier
from serve_app.model_source import local_model_folder
from serve_app.settings import DEFAULT_MODEL_DIR, TRAIN_COMMAND, deployment_options, merge

ARGS = ("model_dir", "config")


class BuildError(UserError, click.ClickException):
    """A bad application argument or model folder.

    The ``serve`` CLI prints a ``ClickException`` as one ``Error: ...`` line and
    exits non-zero; Python callers catch it as the project's ``UserError``.
    """

    def __init__(self, message: str) -> None:
        click.ClickException.__init__(self, message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (BuildError, (self.message,))


def build_app(
    model_dir: str | Path = DEFAULT_MODEL_DIR,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Application:
    """The classifier application for ``model_dir``, with settings from ``config``.

    ``config`` is a Serve config file (default ``configs/serve.yaml``) whose
    ``ImageClassifier`` deployment entry gives autoscaling, batching, resources
    and limits; ``overrides`` (same keys, merged on top) are for tests and tools.
    Fails before anything is deployed, with one line naming the path, when the
    model folder is missing or invalid or its weights are not finite.
    """
    _proxy_retry_for_a_local_cluster()
    if str(model_dir) == DEFAULT_MODEL_DIR and not Path(DEFAULT_MODEL_DIR).exists():
        raise BuildError(
            f"no model at {DEFAULT_MODEL_DIR}: train one with `{TRAIN_COMMAND}`, "
            "or pass model_dir=PATH_OR_URI"
        )
    try:
        path = local_model_folder(model_dir)
        options = merge(deployment_options(config), overrides or {})
    except UserError as exc:
        raise BuildError(str(exc)) from None
    deployment: Any = ImageClassifier  # the @serve.deployment wrapper, typed by its class
    # A URI goes to the replicas as it is: each downloads it once into its node's cache.
    source = str(model_dir) if is_uri(str(model_dir)) else str(path)
    application: Application = deployment.options(**options).bind(source)
    return application


def _proxy_retry_for_a_local_cluster() -> None:
    """``serve run serve_app:app`` passes Serve no ``controller_options`` but builds the app before
    it starts a local cluster: the variable set here reaches that cluster's proxy, which then
    retries requests of a lost replica as ``configs/serve.yaml`` asks (see ``serve_app.retry``)."""
    import os

    import ray

    from serve_app.retry import proxy_env

    if not ray.is_initialized():
        for key, value in proxy_env().items():
            os.environ.setdefault(key, value)


def app(args: dict[str, str]) -> Application:
    """Serve application builder; ``args`` are the ``key=value`` words after the import path."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise BuildError(
            f"unknown application argument(s) {', '.join(unknown)}; use model_dir=PATH, config=FILE"
        )
    return build_app(args.get("model_dir") or DEFAULT_MODEL_DIR, args.get("config") or None)
