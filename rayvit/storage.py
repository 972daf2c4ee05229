"""Run storage: a local or shared folder, or a storage URI, reached through pyarrow.

Ray Train and Tune write checkpoints and experiment state through a pyarrow
filesystem; everything else a run writes (the run's config, ``sweep.csv``, the
exported ``best/`` folder) goes through the same filesystem, so no step assumes
that the driver's disk is the workers' disk. ``gs://`` and ``s3://`` work as
pyarrow resolves them (credentials from the environment, ``AWS_ENDPOINT_URL``);
``storage.endpoint_url`` points ``s3://`` at another S3-compatible server.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from rayvit.errors import UserError

#: Written last into an exported folder: a folder without it is incomplete.
COMPLETE_MARKER = "metrics.json"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@dataclass(frozen=True)
class Storage:
    """Where one run lives; frozen and small, so it crosses Ray boundaries as it is."""

    root: str
    """An absolute local path or a URI (``scheme://bucket/prefix``), without a trailing slash."""
    endpoint_url: str | None = None
    key: str = "output_dir"
    """The config key the root came from, for error lines."""

    @classmethod
    def from_setting(cls, value: str, endpoint_url: str | None = None, key: str = "output_dir") -> Storage:
        if value.startswith("file://"):
            value = value[len("file://") :]
        if is_uri(value):
            return cls(value.rstrip("/"), endpoint_url, key)
        return cls(str(Path(value).expanduser().resolve()), endpoint_url, key)

    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def uri(self, *parts: str) -> str:
        """The URI (or local path) of ``parts`` under the root."""
        return "/".join([self.root, *parts]) if parts else self.root

    def child(self, *parts: str) -> Storage:
        return Storage(self.uri(*parts), self.endpoint_url, self.key)

    # -- pyarrow ------------------------------------------------------------------------------
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem of the root (what Ray Train's ``storage_filesystem`` takes)."""
        return self._resolve()[0]

    def fs_path(self, *parts: str) -> str:
        """The path of ``parts`` inside ``filesystem()`` (no scheme)."""
        base = self._resolve()[1]
        return "/".join([base, *parts]) if parts else base

    def _resolve(self) -> tuple[pafs.FileSystem, str]:
        if self.is_local:
            return pafs.LocalFileSystem(), self.root
        scheme, _, rest = self.root.partition("://")
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if scheme == "s3" and endpoint:
            # An explicit endpoint: short timeouts and few retries, so a wrong address fails fast.
            fs = pafs.S3FileSystem(
                endpoint_override=endpoint,
                scheme="https" if endpoint.startswith("https") else "http",
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                connect_timeout=3,
                request_timeout=30,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
            )
            return fs, rest.rstrip("/")
        try:
            fs, path = pafs.FileSystem.from_uri(self.root)
        except (ValueError, OSError) as exc:
            raise UserError(f"{self.key}: cannot open {self.root}: {_first_line(exc)}") from exc
        return fs, path.rstrip("/")

    # -- small files ----------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        info = self._info(*parts)
        return bool(info.type != pafs.FileType.NotFound)

    def is_file(self, *parts: str) -> bool:
        return bool(self._info(*parts).type == pafs.FileType.File)

    def _info(self, *parts: str) -> pafs.FileInfo:
        try:
            return self.filesystem().get_file_info(self.fs_path(*parts))
        except OSError as exc:
            raise UserError(f"{self.key}: cannot read {self.uri(*parts)}: {_first_line(exc)}") from exc

    def read_bytes(self, *parts: str) -> bytes:
        try:
            with self.filesystem().open_input_stream(self.fs_path(*parts)) as f:
                return bytes(f.read())
        except (OSError, FileNotFoundError) as exc:
            raise UserError(f"{self.key}: cannot read {self.uri(*parts)}: {_first_line(exc)}") from exc

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write one file whole: renamed into place locally, a single PUT on object stores."""
        if self.is_local:
            path = Path(self.uri(*parts))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        try:
            with self.filesystem().open_output_stream(self.fs_path(*parts)) as f:
                f.write(data)
        except OSError as exc:
            raise UserError(f"{self.key}: cannot write {self.uri(*parts)}: {_first_line(exc)}") from exc

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def delete(self, *parts: str) -> None:
        """Remove a file or folder under the root; nothing there is fine."""
        fs, path = self.filesystem(), self.fs_path(*parts)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    def check_writable(self) -> None:
        """Fail within seconds, with one line naming the setting, unless the root takes a write."""
        probe = f".write-check-{os.getpid()}"
        try:
            fs, base = self.filesystem(), self.fs_path()
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(f"{base}/{probe}") as f:
                f.write(b"ok")
            fs.delete_file(f"{base}/{probe}")
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{self.key}: cannot write to {self.root}: {_first_line(exc)}") from exc

    # -- folders ----------------------------------------------------------------------------------
    def upload_dir(self, local: Path, *parts: str, last: str | None = COMPLETE_MARKER) -> str:
        """Copy a local folder to ``parts``, replacing what is there; ``last`` is written last.

        On object stores there is no atomic folder rename: a reader takes the folder as
        complete only when ``last`` is there, so it is removed first and written last.
        """
        dest = self.uri(*parts)
        if self.is_local:
            _replace_local_dir(local, Path(dest))
            return dest
        fs, path = self.filesystem(), self.fs_path(*parts)
        try:
            if last is not None and fs.get_file_info(f"{path}/{last}").type == pafs.FileType.File:
                fs.delete_file(f"{path}/{last}")
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir_contents(path)
            for f in sorted(p for p in local.rglob("*") if p.is_file() and p.name != last):
                rel = f.relative_to(local).as_posix()
                pafs.copy_files(str(f), f"{path}/{rel}", destination_filesystem=fs)
            if last is not None and (local / last).is_file():
                pafs.copy_files(str(local / last), f"{path}/{last}", destination_filesystem=fs)
        except OSError as exc:
            raise UserError(f"{self.key}: cannot write {dest}: {_first_line(exc)}") from exc
        return dest

    def download_dir(self, dest: Path, *parts: str) -> Path:
        """Copy the folder at ``parts`` to a local folder (replaced whole, atomically)."""
        src = self.uri(*parts)
        if self.is_local:
            if not Path(src).is_dir():
                raise UserError(f"{self.key}: no such folder: {src}")
            _replace_local_dir(Path(src), dest)
            return dest
        fs, path = self.filesystem(), self.fs_path(*parts)
        if self._info(*parts).type != pafs.FileType.Directory:
            raise UserError(f"{self.key}: nothing at {src}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            pafs.copy_files(
                path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
            _replace_local_dir(tmp, dest)
        except OSError as exc:
            raise UserError(f"{self.key}: cannot download {src}: {_first_line(exc)}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _replace_local_dir(src: Path, dest: Path) -> None:
    """Put a copy of ``src`` at ``dest``: copied beside it, then swapped in by rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.resolve() != tmp.resolve():
        shutil.copytree(src, tmp)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def fetch_dir(
    uri: str, cache_dir: str | Path, endpoint_url: str | None = None, key: str = "model_dir"
) -> Path:
    """A local copy of the folder at ``uri``: the folder itself when local, else a cached download.

    The cache entry is keyed by the URI and the remote ``metrics.json``, so a new export at the
    same URI is fetched again and an unchanged one only once per node.
    """
    store = Storage.from_setting(uri, endpoint_url, key)
    if store.is_local:
        return Path(store.root)
    if not store.is_file(COMPLETE_MARKER):
        raise UserError(f"{key}: no exported model at {uri} (no {COMPLETE_MARKER})")
    digest = hashlib.sha256(uri.encode() + b"\0" + store.read_bytes(COMPLETE_MARKER)).hexdigest()[:16]
    dest = Path(cache_dir).expanduser() / "models" / f"{store.name}-{digest}"
    if not (dest / COMPLETE_MARKER).is_file():
        store.download_dir(dest)
    return dest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
