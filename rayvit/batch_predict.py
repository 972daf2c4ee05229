"""Offline batch prediction on Ray Data: label a folder, a bucket or a data set with an exported model.

The input is read by the training readers (``rayvit.readers``: hub-layout parquet, an imagefolder,
a flat folder of images, a hub id; local or at a storage URI) and decoded by the one decode path
(``decode_unit``); the model runs in an autoscaling pool of actors (``PredictBatch``, a callable
class around ``Predictor``), on a GPU each when the cluster has them (bf16 there, decoding in CPU
tasks of its own), else on their CPUs (decoding fused into their tasks); small CPU tasks write
each batch of result rows as a Parquet file under ``<output>/predictions/`` as it comes. The
driver only ever sees one small row of counts per written file: progress, and the confusion
matrix when the input has labels.

A file that cannot be read or decoded becomes a row with its reason in ``error``; the job goes
on. Reruns are safe: ``<output>/job.json`` names the model and input the output belongs to; the
same job finished is not run again, an unfinished one is redone from scratch, another model or
input is refused unless ``overwrite``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import resource
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import Field, ValidationError

from rayvit.config import DataConfig, PositiveInt, RayConfig, _Section
from rayvit.errors import UserError
from rayvit.readers import Source, decode_unit, open_source, units_for
from rayvit.storage import Storage, fetch_dir

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
PREDICTIONS = "predictions"
#: What a job writes into its output folder (all that ``overwrite`` removes).
OUTPUTS = (PREDICTIONS, SUMMARY_FILE, "metrics.json", "confusion.json", "confusion.png", JOB_FILE)
#: Bytes of a decoded row besides its pixels (label, index, source, error).
ROW_OVERHEAD = 256
MAX_BLOCK_BYTES = 16 * 1024 * 1024
#: A GPU model actor task's images at most (the model still runs ``batch_size`` at a time). Each
#: task costs the actor its input and output blocks and a round trip, while the model waits: with
#: tasks of 256 quick-model images fed by decode tasks, the actor spent 13-30% of its time between
#: them. (On CPUs a task is one unit, decoded in the task itself.)
ACTOR_TASK_ROWS = 1024


class BatchConfig(_Section):
    """Settings of one batch prediction job (``key=value`` on the command line)."""

    model_dir: str = Field("", min_length=1)
    """Exported model folder, local or at a storage URI (``--model-dir``)."""
    input: str = Field("", min_length=1)
    """Images to label: an imagefolder, a flat folder of images, hub-layout parquet (local or at a
    storage URI) or a hub data set id (``--input``)."""
    output: str = Field("", min_length=1)
    """Folder or storage URI for the Parquet files, summary and reports (``--output``)."""
    overwrite: bool = False
    """Replace what another job wrote to ``output`` (``--overwrite``)."""
    split: str | None = None
    """Only this split of the input (e.g. ``test``); null = every split."""
    limit: PositiveInt | None = None
    """First N images of each split only; null = all."""
    batch_size: PositiveInt = 64
    """Images per model call in an actor."""
    concurrency: list[PositiveInt] = Field([1, 4], min_length=2, max_length=2)
    """Smallest and largest number of model actors; Ray Data scales the pool between them."""
    num_gpus: float | None = Field(None, ge=0.0)
    """GPUs of one model actor (fractions share a GPU); null = 1 when the cluster has GPUs, else 0."""
    actor_cpus: float = Field(1.0, ge=0.0)
    """Logical CPUs of one model actor (its torch threads on a CPU). Without GPUs the actor also
    decodes its images: give it the cores of a node, or of a share of one."""
    decode_cpus: float = Field(1.0, gt=0.0)
    """Logical CPUs of one decode task, when the model actors have GPUs (without GPUs decoding
    runs in the actors' own tasks)."""
    decode_batch_size: PositiveInt = 256
    """Images per block that decoding yields (at most 16 MiB of them; without GPUs, whole model
    batches)."""
    write_rows: PositiveInt = 4096
    """Result rows per written Parquet file (and per progress update)."""
    top_k: PositiveInt = 5
    """Labels and probabilities of the k most probable classes in every row."""
    image_column: str | None = None
    """Parquet or hub input: the image column; null = the first ``Image`` feature."""
    label_column: str | None = None
    """Parquet or hub input: the label column; null = the first ``ClassLabel`` feature."""
    cache_dir: str | None = "~/.cache/rayvit"
    """Where a hub data set and a model from a storage URI are downloaded to."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for ``s3://`` model, input and output (MinIO, a local test server)."""
    progress_s: float = Field(10.0, gt=0.0)
    """Seconds between progress lines."""
    ray: RayConfig = RayConfig()
    """Ray cluster to run on."""


def parse_argv(argv: Sequence[str] | None = None) -> BatchConfig:
    """``ray_jobs/predict.py``'s command line: the flags, then ``key=value`` for any other key."""
    import argparse

    from rayvit.config import config_keys

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
    given = [f"model_dir={args.model_dir}", f"input={args.input}", f"output={args.output}"]
    return load_batch_config([*given, *(["overwrite=true"] if args.overwrite else []), *args.overrides])


def load_batch_config(overrides: Sequence[str]) -> BatchConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}' must look like key=value (e.g. batch_size=128)")
    try:
        raw = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except OmegaConfBaseException as exc:
        raise UserError(f"cannot read overrides: {exc}") from exc
    try:
        return BatchConfig.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            match = difflib.get_close_matches(key, list(BatchConfig.model_fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise UserError(f"unknown key '{key}'{hint}") from None
        raise UserError(f"invalid value for '{key}': {e['msg']} (got {e.get('input')!r})") from None


# -- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows of the model without loading it."""

    path: Path
    """The local copy (a storage URI's is downloaded once a node)."""
    labels: tuple[str, ...]
    side: int
    fingerprint: str
    """The first 16 hex digits of the weights' SHA-256."""


def model_info(cfg: BatchConfig) -> ModelInfo:
    from rayvit.checkpoint import PROCESSOR_FILE, check_model_folder
    from rayvit.preprocess import Preprocessor

    path = check_model_folder(fetch_dir(cfg.model_dir, cfg.cache_dir or "~/.cache/rayvit", cfg.endpoint_url))
    config = json.loads((path / "config.json").read_text())
    labels = tuple(config["id2label"][str(i)] for i in range(len(config["id2label"])))
    side = Preprocessor.from_processor_config(json.loads((path / PROCESSOR_FILE).read_text())).image_size
    digest = hashlib.sha256()
    with (path / "model.safetensors").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return ModelInfo(path, labels, side, digest.hexdigest()[:16])


class PredictBatch:
    """The model actor of the pool: a ``Predictor`` on this actor's device (its GPU, if given
    one; bf16 there), turning blocks of decoded images into result rows."""

    def __init__(
        self, model_dir: str, cache_dir: str, endpoint_url: str | None, top_k: int, batch_size: int
    ) -> None:
        from rayvit.predict import Predictor

        self.predictor = Predictor(fetch_dir(model_dir, cache_dir, endpoint_url))
        self.k = max(1, min(top_k, len(self.predictor.labels)))
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["index"])
        ok = np.flatnonzero(batch["error"] == "")
        pred = np.full(n, -1, dtype=np.int64)
        top_i = np.zeros((n, self.k), dtype=np.int64)
        top_p = np.zeros((n, self.k), dtype=np.float32)
        for s in range(0, len(ok), self.batch_size):
            rows = ok[s : s + self.batch_size]
            probs = self.predictor.probabilities(list(batch["image"][rows]))
            values, indices = probs.topk(self.k, dim=-1)
            top_i[rows], top_p[rows] = indices.numpy(), values.numpy()
        pred[ok] = top_i[ok, 0]
        return {
            "source": batch["source"],
            "split": batch["split"],
            "index": batch["index"],
            "true": batch["label"],
            "pred": pred,
            "top_i": top_i,
            "top_p": top_p,
            "error": batch["error"],
        }


# -- the pipeline -------------------------------------------------------------------------------


def _decode(
    batch: dict[str, np.ndarray], source: Source, side: int, block_rows: int
) -> Iterator[dict[str, Any]]:
    """The decode tasks' function: one unit in, blocks of images (or error rows) out."""
    for unit, split in zip(batch["unit"], batch["split"], strict=True):
        for block in decode_unit(str(unit), source, side, block_rows, errors=True):
            block["split"] = np.full(len(block["index"]), str(split), dtype=object)
            yield block


def _write(batch: dict[str, np.ndarray], out: Storage, job: dict[str, Any]) -> dict[str, np.ndarray]:
    """The write tasks' function: one Parquet file of result rows, and one row of counts back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = np.asarray(job["labels"], dtype=object)
    truth_map = np.asarray(job["truth_map"], dtype=np.int64)
    n, k = len(batch["index"]), job["num_labels"]
    good = batch["error"] == ""
    pred = batch["pred"]
    cols: dict[str, Any] = {
        "source": pa.array(batch["source"].tolist(), pa.string()),
        "split": pa.array(batch["split"].tolist(), pa.string()),
        "index": pa.array(batch["index"], pa.int64()),
        "label": pa.array([labels[p] if g else None for p, g in zip(pred, good, strict=True)], pa.string()),
        "probability": pa.array(
            [float(p[0]) if g else None for p, g in zip(batch["top_p"], good, strict=True)], pa.float32()
        ),
        "top_labels": pa.array(
            [labels[i].tolist() if g else None for i, g in zip(batch["top_i"], good, strict=True)],
            pa.list_(pa.string()),
        ),
        "top_probabilities": pa.array(
            [p.tolist() if g else None for p, g in zip(batch["top_p"], good, strict=True)],
            pa.list_(pa.float32()),
        ),
    }
    cm = np.zeros((k, k), dtype=np.int64)
    if job["labelled"]:
        truth = np.where(batch["true"] >= 0, truth_map[np.maximum(batch["true"], 0)], -1)
        names = [job["source_names"][t] if t >= 0 else None for t in batch["true"]]
        cols["true_label"] = pa.array(names, pa.string())
        known = good & (truth >= 0)
        correct = [bool(t == p) if g else None for t, p, g in zip(truth, pred, known, strict=True)]
        cols["correct"] = pa.array(correct, pa.bool_())
        np.add.at(cm, (truth[known], pred[known]), 1)
    cols["error"] = pa.array([e or None for e in batch["error"].tolist()], pa.string())
    cols["model"] = pa.array([job["model"]] * n, pa.string())
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf)
    # Whole or not at all: renamed into place locally, one PUT on object stores.
    out.write_bytes(buf.getvalue().to_pybytes(), PREDICTIONS, f"part-{uuid.uuid4().hex}.parquet")
    return {"rows": np.asarray([n]), "errors": np.asarray([int((~good).sum())]), "cm": cm.reshape(1, -1)}


@dataclass
class Plan:
    source: Source
    units: list[dict[str, str]]
    total: int
    truth_map: list[int] | None
    """The model's label index of each of the input's classes; None: no true labels to compare."""
    note: str = ""


def plan_input(cfg: BatchConfig, labels: tuple[str, ...]) -> Plan:
    data = DataConfig(
        path=cfg.input, image_column=cfg.image_column, label_column=cfg.label_column, cache_dir=cfg.cache_dir
    )
    source = open_source(data, cfg.endpoint_url, unlabelled=True)
    splits = [cfg.split] if cfg.split else sorted(source.splits)
    units, total = [], 0
    for split in splits:
        n = source.split(split).num_rows
        rows = np.arange(min(n, cfg.limit or n))
        total += len(rows)
        units += [{"unit": u, "split": split} for u in units_for(source, split, rows)]
    if not total:
        raise UserError(f"--input: no images in {cfg.input}")
    missing = [c for c in source.class_names if c not in labels]
    if source.labelled and not missing:
        return Plan(source, units, total, [labels.index(c) for c in source.class_names])
    note = f"the input's classes {missing[:5]} are not the model's labels: no accuracy" if missing else ""
    return Plan(source, units, total, None, note)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def actor_rows(batch_size: int, row_bytes: int) -> int:
    """Images per model actor task (Ray Data's batch): whole model batches, up to
    ``ACTOR_TASK_ROWS`` images and ``MAX_BLOCK_BYTES``, at least one model batch."""
    fit = min(ACTOR_TASK_ROWS, MAX_BLOCK_BYTES // row_bytes)
    return batch_size * max(1, fit // batch_size)


def build_dataset(cfg: BatchConfig, plan: Plan, model: ModelInfo, out: Storage) -> Any:
    """The lazy Ray Data pipeline: decode tasks -> model actors -> write tasks -> counts."""
    import ray.data

    from rayvit.data import decode_tasks, no_memory_warnings

    source = plan.source
    job = {
        "labels": list(model.labels),
        "num_labels": len(model.labels),
        "labelled": plan.truth_map is not None,
        "source_names": list(source.class_names),
        "truth_map": plan.truth_map or [],
        "model": model.fingerprint,
    }
    side = model.side
    row_bytes = side * side * 3 + ROW_OVERHEAD
    rows = max(1, min(cfg.decode_batch_size, MAX_BLOCK_BYTES // row_bytes))
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if cluster_gpus() > 0 else 0.0)
    on_gpu = num_gpus > 0
    if not on_gpu and rows > cfg.batch_size:  # the actor's own blocks: whole model batches
        rows -= rows % cfg.batch_size
    decode: Any = _decode
    items = ray.data.from_items(plan.units, override_num_blocks=max(1, len(plan.units)))
    # Training's decode step. With GPUs it runs in CPU tasks of its own, so the device never
    # waits on decoding: its ``memory=0``, a remote argument the actors lack, keeps Ray Data
    # from fusing it into them. Without GPUs the actors' cores are the device: the same CPUs and
    # ``memory=0`` on both let Ray Data fuse decoding into the actor's tasks, a unit each, which
    # decode and then run the model on their own cores, as the in-process loop does. A decode
    # process beside the actor only took turns with it on the same cores (docs/batch.md).
    ds = decode_tasks(items, decode, source, side, rows, cfg.decode_cpus if on_gpu else cfg.actor_cpus)
    ds = ds.map_batches(
        PredictBatch,
        batch_size=actor_rows(cfg.batch_size, row_bytes) if on_gpu else None,
        fn_constructor_kwargs={
            "model_dir": cfg.model_dir,
            "cache_dir": cfg.cache_dir or "~/.cache/rayvit",
            "endpoint_url": cfg.endpoint_url,
            "top_k": cfg.top_k,
            "batch_size": cfg.batch_size,
        },
        compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
        num_cpus=cfg.actor_cpus,
        num_gpus=num_gpus,
        **({} if on_gpu else {"memory": 0}),
    )
    write: Any = _write
    ds = ds.map_batches(
        write, batch_size=cfg.write_rows, fn_kwargs={"out": out, "job": job}, num_cpus=0.25, memory=0
    )
    ds.context.target_max_block_size = rows * row_bytes
    no_memory_warnings(ds)
    return ds


# -- the job --------------------------------------------------------------------------------------


@dataclass
class Summary:
    rows: int
    errors: int
    wall_s: float
    steady_images_per_s: float
    """After the first results: without the start of actors and the loading of the model."""
    first_results_s: float
    """Until the driver had the first results: mostly the model actors' start (a new process,
    importing torch and the model's library, loading the model), a fixed cost of every job."""
    confusion: np.ndarray | None


def _claim_output(cfg: BatchConfig, out: Storage, job: dict[str, Any]) -> dict[str, Any] | None:
    """Make ``output`` this job's: the finished summary when this job already ran to the end,
    else None once the output holds nothing of another job (refused unless ``overwrite``)."""
    if out.is_file(JOB_FILE):
        before = json.loads(out.read_text(JOB_FILE))
        differs = [k for k in ("model", "input", "split", "limit") if before.get(k) != job[k]]
        if differs and not cfg.overwrite:
            what = ", ".join(f"{k} {before.get(k)!r}" for k in differs)
            raise UserError(
                f"--output: {out.root} holds predictions of another job ({what}); "
                "give another --output, or --overwrite to replace them"
            )
        if not differs and out.is_file(SUMMARY_FILE):
            done: dict[str, Any] = json.loads(out.read_text(SUMMARY_FILE))
            return done
    elif out.exists() and not cfg.overwrite and _holds_files(out):
        raise UserError(
            f"--output: {out.root} is not empty and holds no batch predictions; "
            "give an empty or new folder, or --overwrite"
        )
    for name in OUTPUTS:
        out.delete(name)
    out.check_writable()
    out.filesystem().create_dir(out.fs_path(PREDICTIONS), recursive=True)
    out.write_text(json.dumps(job, indent=2) + "\n", JOB_FILE)
    return None


def _holds_files(out: Storage) -> bool:
    import pyarrow.fs as pafs

    infos = out.filesystem().get_file_info(pafs.FileSelector(out.fs_path(), recursive=False))
    return bool(infos)


def run_batch(cfg: BatchConfig, say: Any = print) -> dict[str, Any]:
    """Run the job on the configured (or ambient) Ray cluster; its summary."""
    from rayvit.cluster import init_ray
    from rayvit.data import quiet_ray_data

    out = Storage.from_setting(cfg.output, cfg.endpoint_url, key="--output")
    model = model_info(cfg)
    job = {
        "model": model.fingerprint,
        "model_dir": cfg.model_dir,
        "input": cfg.input,
        "split": cfg.split,
        "limit": cfg.limit,
    }
    done = _claim_output(cfg, out, job)
    if done is not None:
        say(f"already finished: {out.root} holds this job's {done['rows']} rows (model {model.fingerprint})")
        return done
    plan = plan_input(cfg, model.labels)
    if plan.note:
        say(plan.note)
    say(
        f"predicting {plan.total} images of {cfg.input} ({plan.source.kind}, {len(plan.units)} units) "
        f"with model {model.fingerprint} into {out.root}"
    )
    init_ray(cfg.ray)
    quiet_ray_data()
    summary = _stream(
        build_dataset(cfg, plan, model, out), plan.total, len(model.labels), cfg.progress_s, say
    )
    report = _report(summary, plan, model, out, job)
    out.write_text(json.dumps(report, indent=2) + "\n", SUMMARY_FILE)
    say(_summary_line(report))
    return report


def _stream(ds: Any, total: int, num_labels: int, every_s: float, say: Any) -> Summary:
    """Run the pipeline; the driver sees only one small row of counts per written file."""
    rows = errors = 0
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    t0 = last = time.monotonic()
    first: tuple[float, int] | None = None
    parts = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts += 1
        rows += int(batch["rows"].sum())
        errors += int(batch["errors"].sum())
        cm += batch["cm"].sum(axis=0).reshape(num_labels, num_labels)
        now = time.monotonic()
        first = first or (now, rows)
        if now - last >= every_s:
            last = now
            say(f"predicted {rows}/{total} images ({rows / (now - t0):.1f} images/s), {errors} errors")
    end = time.monotonic()
    # A rate after the first results needs a few more of them (0: not measured).
    steady = (rows - first[1]) / (end - first[0]) if first and parts > 3 and end > first[0] else 0.0
    return Summary(rows, errors, end - t0, steady, first[0] - t0 if first else 0.0, cm)


def _report(
    summary: Summary, plan: Plan, model: ModelInfo, out: Storage, job: dict[str, Any]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        **job,
        "rows": summary.rows,
        "predicted": summary.rows - summary.errors,
        "errors": summary.errors,
        "wall_s": round(summary.wall_s, 2),
        "images_per_s": round(summary.rows / max(summary.wall_s, 1e-9), 1),
        "steady_images_per_s": round(summary.steady_images_per_s, 2),
        "first_results_s": round(summary.first_results_s, 2),
        "driver_peak_rss_mib": round(peak_rss_mib(), 1),
        "output": out.root,
    }
    if plan.truth_map is not None and summary.confusion is not None and summary.confusion.sum():
        report.update(write_confusion(summary.confusion, list(model.labels), out))
    return report


def write_confusion(cm: np.ndarray, labels: list[str], out: Storage) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class accuracy and the confusion matrix (JSON + PNG), as the test
    evaluation reports them."""
    import tempfile

    from rayvit.plots import plot_confusion
    from rayvit.predict import confusion_report

    metrics = {"evaluated": int(cm.sum()), **confusion_report(cm, labels)}
    out.write_text(json.dumps(metrics, indent=2) + "\n", "metrics.json")
    out.write_text(json.dumps({"labels": labels, "matrix": cm.tolist()}) + "\n", "confusion.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_confusion(cm, labels, Path(tmp) / "confusion.png", "batch prediction confusion matrix")
        out.write_bytes(png.read_bytes(), "confusion.png")
    return {"accuracy": metrics["accuracy"]}


def peak_rss_mib() -> float:
    """This process's peak resident memory: Linux's ``VmHWM`` of this program's own memory
    (``ru_maxrss`` also counts what the parent process held when it forked this one), else
    ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def _summary_line(report: dict[str, Any]) -> str:
    acc = f", accuracy {report['accuracy']:.4f}" if "accuracy" in report else ""
    return (
        f"done: {report['rows']} images in {report['wall_s']:.1f}s ({report['images_per_s']} images/s, "
        f"the first after {report['first_results_s']:.1f}s), "
        f"{report['errors']} errors{acc}; driver peak RSS {report['driver_peak_rss_mib']:.0f} MiB; "
        f"predictions in {report['output']}/{PREDICTIONS}"
    )
