"""``python -m serve_app [CONFIG]``: ``serve run CONFIG`` with the listening host from the environment.

The config's ``http_options.host`` (loopback in ``configs/serve.yaml``) is kept
unless ``RAYVIT_SERVE_HOST`` says otherwise; this is how the Docker image
becomes reachable from its host only when asked (``-e RAYVIT_SERVE_HOST=0.0.0.0``).
A non-loopback host needs API keys (``RAYVIT_API_KEYS`` or ``api_keys_file``)
unless ``RAYVIT_ALLOW_ANONYMOUS=1``.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
from pathlib import Path

import yaml

from serve_app.http import API_KEYS_ENV
from serve_app.settings import DEFAULT_CONFIG, deployment_options

HOST_ENV = "RAYVIT_SERVE_HOST"
ANONYMOUS_ENV = "RAYVIT_ALLOW_ANONYMOUS"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare(config: Path, environ: dict[str, str]) -> tuple[dict[str, object], str]:
    """The config with the host applied, or ``SystemExit`` with one line."""
    data = yaml.safe_load(config.read_text())
    http = dict(data.get("http_options") or {})
    host = environ.get(HOST_ENV) or str(http.get("host", "127.0.0.1"))
    keys_file = (deployment_options(config).get("user_config") or {}).get("api_keys_file")
    if (
        not is_loopback(host)
        and not (environ.get(API_KEYS_ENV) or keys_file)
        and environ.get(ANONYMOUS_ENV) != "1"
    ):
        raise SystemExit(
            f"Error: refusing to listen on {host} without API keys: set {API_KEYS_ENV} or "
            f"user_config.api_keys_file (or {ANONYMOUS_ENV}=1 to serve anyone)"
        )
    data["http_options"] = {**http, "host": host}
    return data, host


def main(argv: list[str]) -> None:
    config = Path(argv[0]) if argv else DEFAULT_CONFIG
    data, host = prepare(config, dict(os.environ))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    print(f"serving {config} on {host}", file=sys.stderr)
    os.execvp("serve", ["serve", "run", f.name])


if __name__ == "__main__":
    main(sys.argv[1:])
