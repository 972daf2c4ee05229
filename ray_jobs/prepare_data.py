"""Data step (DVC stage ``prepare``): write CIFAR-10 in hub layout to a folder.

    python ray_jobs/prepare_data.py --source uoft-cs/cifar10 --dest data/cifar10
    python ray_jobs/prepare_data.py --source ../shared/data/cifar10 --dest data/cifar10
    python ray_jobs/prepare_data.py --source ../shared/data/cifar10 --train-limit 512 --test-limit 256

A limit of 0 means the whole split. A bad source fails with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any cwd

from rayvit.cli import run_cli
from rayvit.dvc import data_fingerprint
from rayvit.prepare import prepare_data


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write an image data set in hub parquet layout to a folder.")
    ap.add_argument("--source", default="uoft-cs/cifar10", help="hub id or local folder (hub layout)")
    ap.add_argument("--dest", default="data/cifar10", help="output folder (default: data/cifar10)")
    ap.add_argument("--train-limit", type=int, default=0, help="keep the first N train rows (0 = all)")
    ap.add_argument("--test-limit", type=int, default=0, help="keep the first N test rows (0 = all)")
    args = ap.parse_args(argv)

    def _main() -> None:
        res = prepare_data(
            args.source,
            args.dest,
            train_limit=args.train_limit or None,
            test_limit=args.test_limit or None,
        )
        counts = ", ".join(f"{n} {split}" for split, n in res.rows.items())
        print(f"{res.how} {args.source} -> {res.dest} ({counts}); dvc md5 {data_fingerprint(res.dest)}")

    run_cli(_main)


if __name__ == "__main__":
    main()
