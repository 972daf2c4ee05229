"""Evaluation step (DVC stage ``evaluate``): an exported model folder on the test split.

    python ray_jobs/evaluate.py --model models/quick/best --data data/cifar10 --out reports

Writes ``metrics.json``, ``confusion.csv``/``confusion.png`` and ``training_curve.csv``
(the chosen run's curve, from the model folder) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any cwd

from rayvit.cli import run_cli
from rayvit.evaluate import evaluate_model, write_reports
from rayvit.logs import quiet_libraries


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate an exported model folder on the test split.")
    ap.add_argument("--model", required=True, help="exported model folder (e.g. models/quick/best)")
    ap.add_argument(
        "--data", default="data/cifar10", help="data set with a test split (default: data/cifar10)"
    )
    ap.add_argument("--out", default="reports", help="folder for metrics and plots (default: reports)")
    ap.add_argument("--test-limit", type=int, default=0, help="first N test images only (0 = all)")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)

    def _main() -> None:
        quiet_libraries()
        result = evaluate_model(args.model, args.data, args.test_limit or None, args.batch_size)
        out = write_reports(result, args.out, args.model)
        m = result.metrics
        print(
            f"test_accuracy {m['test_accuracy']:.4f}  test_loss {m['test_loss']:.4f}  "
            f"on {m['num_test']} images; reports in {out}",
            flush=True,
        )

    run_cli(_main)


if __name__ == "__main__":
    main()
