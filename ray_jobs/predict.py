"""Offline batch prediction: label a folder, a bucket or a data set with an exported model.

    python ray_jobs/predict.py --model-dir models/quick/best --input photos/ --output labels/
    ray job submit --address http://HEAD:8265 -- python ray_jobs/predict.py \\
        --model-dir gs://bucket/quick/best --input gs://bucket/new-images --output gs://bucket/labels

Writes Parquet files of one row per image to ``<output>/predictions/``, ``summary.json``, and with
labelled input ``metrics.json`` and ``confusion.json``/``confusion.png``. The logic lives in
``rayvit.batch_predict``; ``key=value`` sets any of its keys (see ``--help``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any cwd

from rayvit.batch_predict import BatchConfig, load_batch_config, run_batch
from rayvit.cli import run_cli
from rayvit.config import config_keys
from rayvit.logs import quiet_libraries


def main(argv: Sequence[str] | None = None) -> None:
    flags = ("model_dir", "input", "output", "overwrite")
    keys = "\n".join(
        f"  {k.key} ({k.type}, default {k.default}): {k.doc}"
        for k in config_keys(BatchConfig)
        if k.key not in flags
    )
    ap = argparse.ArgumentParser(
        prog="ray_jobs/predict.py",
        description="Label images with an exported model on Ray Data.",
        epilog=f"keys (key=value):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model-dir", required=True, help="exported model folder or storage URI")
    ap.add_argument("--input", required=True, help="images: a folder, storage URI or hub data set id")
    ap.add_argument("--output", required=True, help="folder or storage URI for the Parquet output")
    ap.add_argument("--overwrite", action="store_true", help="replace another job's output")
    ap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. batch_size=128 'concurrency=[1,8]'"
    )
    args = ap.parse_args(argv)

    def _main() -> None:
        quiet_libraries()
        given = [f"model_dir={args.model_dir}", f"input={args.input}", f"output={args.output}"]
        cfg = load_batch_config([*given, *(["overwrite=true"] if args.overwrite else []), *args.overrides])
        run_batch(cfg, lambda line: print(line, flush=True))

    run_cli(_main)


if __name__ == "__main__":
    main()
