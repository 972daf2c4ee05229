"""wandb runs: one per training run (one per Tune trial), created on rank 0 only.

Mode ``auto`` is online when ``WANDB_API_KEY`` is set and offline otherwise, with
the run files under ``<output_dir>/wandb``. The key is only ever read from the
environment by wandb itself; it never enters config, code or logs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from rayvit.config import Config
from rayvit.logs import say


def resolve_mode(cfg: Config) -> str:
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def run_id(group: str, name: str) -> str:
    """Stable id, so a resumed run appends to the same wandb run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{group}-{name}")[:120]


class Tracker:
    """A wandb run that, when finished, also shuts down this process's wandb service.

    Left to wandb's ``atexit`` hook, that shutdown runs while Ray is killing the worker
    process (Train V2 ends its workers with ``ray.kill``) and dies with "Fatal Python error:
    Aborted" and a traceback after a run that went fine. ``wandb.teardown`` now, while the
    process is healthy, unregisters that hook.
    """

    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics)

    @property
    def summary(self) -> Any:
        return self.run.summary

    def finish(self) -> None:
        import wandb

        try:
            self.run.finish()
            wandb.teardown()
        except Exception as exc:  # tracking problems never fail a run
            say(f"warning: wandb did not close cleanly: {str(exc).splitlines()[-1][:200]}")


def start_run(cfg: Config, group: str, name: str, directory: Path, mode: str) -> Tracker | None:
    """A wandb run, or None when disabled."""
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    base = run_id(group, name)
    # A crashed process can leave its run id "in use"; then continue in a fresh run of
    # the same group and name. Tracking problems never stop training.
    for rid in (base, f"{base}-{int(time.time())}"):
        try:
            run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=group,
                name=name,
                id=rid,
                resume="allow",
                dir=str(directory),
                mode=mode,  # type: ignore[arg-type]
                config=cfg.to_dict(),
                reinit="finish_previous",
            )
            return Tracker(run)
        except Exception as exc:
            last = exc
    say(f"warning: wandb disabled for {name}: {str(last).splitlines()[-1][:200]}")
    return None


def log_final(
    cfg: Config,
    group: str,
    name: str,
    directory: Path,
    mode: str,
    metrics: dict[str, Any],
    images: list[Path],
) -> None:
    """Append the chosen model's test metrics and plots to its trial's wandb run."""
    run = start_run(cfg, group, name, directory, mode)
    if run is None:
        return
    import wandb

    run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    run.log({p.stem: wandb.Image(str(p)) for p in images if p.is_file()})
    run.finish()
