"""Offline batch prediction: label a folder, a bucket or a data set with an exported model.

    python ray_jobs/predict.py --model-dir models/quick/best --input photos/ --output labels/
    ray job submit --address http://HEAD:8265 -- python ray_jobs/predict.py \\
        --model-dir gs://bucket/quick/best --input gs://bucket/new-images --output gs://bucket/labels

Writes Parquet files of one row per image to ``<output>/predictions/``, ``summary.json``, and with
labelled input ``metrics.json`` and ``confusion.json``/``confusion.png``. The logic lives in
``rayvit.batch_predict``; ``key=value`` sets any of its keys (see ``--help``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any cwd

from rayvit.batch_predict import parse_argv, run_batch
from rayvit.cli import run_cli
from rayvit.logs import quiet_libraries


def main(argv: Sequence[str] | None = None) -> None:
    def _main() -> None:
        quiet_libraries()
        run_batch(parse_argv(argv), lambda line: print(line, flush=True))

    run_cli(_main)


if __name__ == "__main__":
    main()
