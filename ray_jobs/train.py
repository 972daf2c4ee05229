"""Main job: ``python ray_jobs/train.py [--config FILE] [key=value ...]``.

A Ray Tune learning-rate sweep of Ray Train runs when ``tune.*`` names more than
one learning rate, else a single Ray Train run; either way the best model by
validation accuracy is tested once and exported to ``<output_dir>/best``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any cwd

from rayvit.cli import TRAIN_DESCRIPTION, TRAIN_PROG, parse_config, run_cli
from rayvit.cluster import shutdown_ray
from tuning import run_job

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "train.yaml")


def main(argv: Sequence[str] | None = None) -> None:
    def _main() -> None:
        cfg = parse_config(argv, DEFAULT_CONFIG, TRAIN_DESCRIPTION, TRAIN_PROG)
        try:
            summary = run_job(cfg)
        finally:
            # Before the job's last line: Ray ends once its trial and Train actors have exited,
            # so that none is killed halfway through its exit (a traceback in the output).
            shutdown_ray()
        state = "already finished" if summary.resumed_finished else "exported"
        print(
            f"{state}: {summary.best_dir}  test_accuracy {summary.metrics.get('test_accuracy', float('nan')):.4f}  "
            f"val_accuracy {summary.metrics.get('val_accuracy', float('nan')):.4f}",
            flush=True,
        )

    run_cli(_main)


if __name__ == "__main__":
    main()
