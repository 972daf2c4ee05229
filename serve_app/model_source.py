"""Where the served model comes from: the app's ``model_dir`` argument -> a verified local folder.

Every path from an application argument to loaded weights goes through
``local_model_folder``. ``model_dir`` is a local folder or a storage URI
(``gs://…/best``, ``s3://…/best``, what the training job exports there): a URI is
downloaded once per node into ``RAYVIT_CACHE`` (default ``~/.cache/rayvit``), keyed by
the URI and the export's ``metrics.json``, and then checked like a local folder. Credentials
and a custom S3 endpoint (``AWS_ENDPOINT_URL``) come from the environment, as for pyarrow.
"""

from __future__ import annotations

import os
from pathlib import Path

from rayvit.checkpoint import verify_model_folder
from rayvit.errors import UserError
from rayvit.storage import fetch_dir, is_uri

WEIGHTS_FILE = "model.safetensors"


def local_model_folder(model_dir: str | Path, check_weights: bool = True) -> Path:
    """A complete, readable exported model folder, or ``UserError`` with one line naming it.

    ``check_weights`` also reads every tensor and refuses NaN or infinite values
    (a diverged run), so such a model fails before anything is deployed.
    """
    path = verify_model_folder(fetch_model(str(model_dir)))
    if check_weights:
        check_finite_weights(path)
    return path


def fetch_model(model_dir: str) -> Path:
    """The folder itself, or a node-local copy of the folder at a storage URI."""
    if not is_uri(model_dir):
        return Path(model_dir).expanduser().resolve()
    return fetch_dir(model_dir, os.environ.get("RAYVIT_CACHE", "~/.cache/rayvit"))


def check_finite_weights(path: Path) -> None:
    import torch
    from safetensors import safe_open

    bad: list[str] = []
    count = 0
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = f.get_tensor(name)
            if tensor.is_floating_point():
                n = int((~torch.isfinite(tensor)).sum())
                if n:
                    bad.append(name)
                    count += n
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(
            f"model folder {path}: weights are not finite ({count} NaN/inf values in {bad[0]}{more}); "
            "the run diverged: serve another checkpoint"
        )
