"""URIs → filesystems. Every path in a config (local path, ``file://``, ``s3://``) goes through here.

Two clients, each where it is strongest:

* pyarrow's filesystems for reading data and for Ray Train's ``storage_filesystem`` (checkpoints
  are uploaded by Ray through it);
* boto3 for artifacts (whole model directories up and down): managed multipart transfers and
  botocore's retry modes, so a flaky store is retried with backoff and no hand-written loop.

S3 settings (endpoint for MinIO/Ceph/moto, region, credentials) come from the config's `storage.s3`
section, else the standard AWS chain (environment variables, profiles, instance roles). This is
the one module that reads AWS environment variables. Credentials are never logged or written.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow.fs as pafs

from orchestrator.errors import DataError, StorageError

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. Empty fields fall back to the AWS default chain."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    access_key_id: Optional[str] = field(default=None, repr=False)
    secret_access_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    profile: Optional[str] = None
    max_attempts: int = 10
    multipart_threshold_mb: int = 64
    max_concurrency: int = 8

    @property
    def resolved_endpoint(self) -> Optional[str]:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def resolved_region(self) -> Optional[str]:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


_settings = S3Settings()
_lock = threading.Lock()


def configure(settings: S3Settings) -> None:
    """Use `settings` for every S3 access of this process (drivers and workers call it once)."""
    global _settings
    with _lock:
        if settings != _settings:
            _settings = settings
            _pyarrow_s3.cache_clear()
            _boto_client.cache_clear()


def current_settings() -> S3Settings:
    return _settings


@functools.lru_cache(maxsize=1)
def _pyarrow_s3() -> pafs.S3FileSystem:
    s = _settings
    kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s.max_attempts)}
    endpoint = s.resolved_endpoint
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") if host else endpoint, scheme=scheme if host else "https")
    if s.resolved_region:
        kwargs["region"] = s.resolved_region
    if s.access_key_id and s.secret_access_key:
        kwargs.update(access_key=s.access_key_id, secret_key=s.secret_access_key, session_token=s.session_token)
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=1)
def _boto_client() -> Any:
    import boto3
    from botocore.config import Config

    s = _settings
    session = boto3.session.Session(profile_name=s.profile) if s.profile else boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=s.resolved_endpoint,
        region_name=s.resolved_region,
        aws_access_key_id=s.access_key_id,
        aws_secret_access_key=s.secret_access_key,
        aws_session_token=s.session_token,
        config=Config(
            retries={"max_attempts": s.max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=max(10, s.max_concurrency * 2),
        ),
    )


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    mb = 1024 * 1024
    return TransferConfig(
        multipart_threshold=_settings.multipart_threshold_mb * mb,
        multipart_chunksize=max(8, _settings.multipart_threshold_mb // 4) * mb,
        max_concurrency=_settings.max_concurrency,
    )


# ----------------------------------------------------------------------------- paths


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than file:// (s3://, gs://, ...)."""
    return "://" in uri and not uri.startswith("file://")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> str:
    """Absolute local path of a local path or file:// URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key/prefix → (bucket, key/prefix)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket: s3://bucket/prefix")
    return bucket, key.strip("/")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a path or URI."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _pyarrow_s3(), f"{bucket}/{key}".rstrip("/")
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise StorageError(f"cannot open {uri}: {exc}") from exc


def to_uri(uri_like: str, filesystem: Optional[pafs.FileSystem]) -> str:
    """Turn a (filesystem, path) pair as Ray reports it back into a URI."""
    if filesystem is not None and filesystem.type_name == "s3":
        return "s3://" + uri_like.lstrip("/")
    return uri_like


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI with '/'."""
    base = uri if is_remote(uri) else local_path(uri)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p.strip("/")]])


def expand(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (recursively) or a glob → sorted list of file paths/URIs with `suffixes`.

    Raises DataError when nothing matches, naming the pattern and the suffixes looked for.
    """
    fs, path = resolve(uri)
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    try:
        if any(c in path for c in _GLOB_CHARS):
            base = path
            while any(c in base for c in _GLOB_CHARS):
                base = base.rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            files = [
                i.path
                for i in infos
                if i.type == pafs.FileType.File and _glob_match(i.path, path) and not _is_hidden(i.path, base)
            ]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"{uri}: no such file or directory")
            if info.type == pafs.FileType.File:
                return [uri if is_remote(uri) else path]
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and not _is_hidden(i.path, path)]
    except OSError as exc:
        raise StorageError(f"cannot list {uri}: {exc}") from exc
    files = sorted(f for f in files if f.lower().endswith(suffixes))
    if not files:
        raise DataError(f"{uri}: matched no files ending in {', '.join(suffixes)}")
    return [prefix + f if prefix else f for f in files]


def _is_hidden(path: str, base: str) -> bool:
    """Dot-files and files inside dot-directories below `base` (.git, .ipynb_checkpoints) are skipped."""
    return any(part.startswith(".") for part in path[len(base) :].split("/") if part)


def _glob_match(candidate: str, pattern: str) -> bool:
    """Shell-style matching: `*` and `?` stay within one path segment, `**/` spans zero or more directories."""
    return _glob_regex(pattern).fullmatch(candidate) is not None


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


# ----------------------------------------------------------------------------- files


def read_bytes(uri: str) -> bytes:
    """Whole file contents."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a (small) file, creating parent directories locally."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3_call(f"upload of {uri}", _boto_client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"cannot reach {uri}: {exc}") from exc


def s3_object_identity(uri: str) -> tuple[int, str]:
    """(size, ETag) of one S3 object: its identity without reading it."""
    bucket, key = split_s3(uri)
    head = _s3_call(f"HEAD of {uri}", _boto_client().head_object, Bucket=bucket, Key=key)
    return int(head["ContentLength"]), str(head["ETag"]).strip('"')


def list_files(uri: str) -> dict[str, int]:
    """Every file below a directory path or URI → size in bytes, keyed by relative path ({} if absent)."""
    return {rel: size for rel, size, _ in _listing(uri)}


def list_file_versions(uri: str) -> dict[str, str]:
    """Every file below a path or URI → "size:version" (S3: the ETag; other stores: mtime), for cache keys."""
    return {rel: f"{size}:{version}" for rel, size, version in _listing(uri)}


def _listing(uri: str) -> Iterator[tuple[str, int, str]]:
    """(relative path, size, version) of every file below a path or URI; nothing if absent."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key + "/" if key else ""
        paginator = _boto_client().get_paginator("list_objects_v2")
        try:
            pages = list(paginator.paginate(Bucket=bucket, Prefix=prefix))
        except Exception as exc:  # botocore raises several unrelated types; name the URI in one error
            raise StorageError(f"cannot list {uri}: {exc}") from exc
        for page in pages:
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # skip directory markers (pyarrow creates them)
                    yield obj["Key"][len(prefix) :], obj["Size"], obj.get("ETag", "").strip('"')
        return
    fs, path = resolve(uri)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            yield info.path[len(path) + 1 :], info.size, str(info.mtime_ns)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to a path or URI (S3: managed multipart uploads, retried by botocore)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client, config = _boto_client(), _transfer_config()
        files = [p for p in Path(local_dir).rglob("*") if p.is_file()]

        def upload(path: Path) -> None:
            target = f"{key}/{path.relative_to(local_dir).as_posix()}".lstrip("/")
            _s3_call(f"upload of {path} to s3://{bucket}/{target}", client.upload_file, str(path), bucket, target,
                     Config=config)

        _parallel(upload, files)
        return
    if is_remote(uri):
        fs, path = resolve(uri)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    dest = local_path(uri)
    if os.path.abspath(local_dir) == dest:
        return
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(local_dir, dest)


def download_dir(uri: str, local_dir: str, skip_suffixes: tuple[str, ...] = ()) -> str:
    """Make a path or URI available as a local directory; returns the local path (no copy for local).

    `skip_suffixes`: remote files whose names end so are not fetched (e.g. weights, for a tokenizer).
    """
    if not is_remote(uri):
        return local_path(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client, config = _boto_client(), _transfer_config()
        objects = [rel for rel in list_files(uri) if not rel.endswith(skip_suffixes)]
        if not objects:
            raise StorageError(f"{uri}: nothing to download (no objects under this prefix)")

        def download(rel: str) -> None:
            target = Path(local_dir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _s3_call(f"download of s3://{bucket}/{key}/{rel}", client.download_file, bucket, f"{key}/{rel}",
                     str(target), Config=config)

        _parallel(download, list(objects))
        return local_dir
    if skip_suffixes:
        for rel in list_files(uri):
            if not rel.endswith(skip_suffixes):
                target = Path(local_dir) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(read_bytes(join(uri, rel)))
        return local_dir
    fs, path = resolve(uri)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def _parallel(fn: Any, items: list) -> None:
    with ThreadPoolExecutor(max_workers=max(1, _settings.max_concurrency)) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def _s3_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a boto3 call (already retried by botocore) and turn its failure into one readable error."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # botocore/boto3 raise many unrelated exception types
        raise StorageError(
            f"S3 {what} failed after up to {_settings.max_attempts} attempts: {type(exc).__name__}: {exc}"
        ) from exc


def ray_storage(uri: str) -> tuple[str, Optional[pafs.FileSystem]]:
    """(storage_path, storage_filesystem) for ray.train.RunConfig."""
    if not is_remote(uri):
        return local_path(uri), None
    fs, path = resolve(uri)
    return path, fs
