"""URIs → filesystems. Every path in a config (local path, ``file://``, ``s3://``) goes through here.

pyarrow's filesystems back both our readers and Ray Train's ``storage_filesystem``, so data,
checkpoints and exported models share one notion of where things are.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from orchestrator.errors import DataError

_GLOB_CHARS = set("*?[")


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than file:// (s3://, gs://, ...)."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """Absolute local path of a local path or file:// URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a path or URI."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot open {uri}: {exc}") from exc


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URI with '/'."""
    base = uri if is_remote(uri) else local_path(uri)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def expand(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (recursively) or a glob → sorted list of file paths/URIs with `suffixes`.

    Raises DataError when nothing matches, naming the pattern and the suffixes looked for.
    """
    fs, path = resolve(uri)
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
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


def read_bytes(uri: str) -> bytes:
    """Whole file contents."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to a path or URI (replacing what is there)."""
    if not is_remote(uri):
        dest = local_path(uri)
        if os.path.abspath(local_dir) == dest:
            return
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(local_dir, dest)
        return
    fs, path = resolve(uri)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str) -> str:
    """Make a path or URI available as a local directory; returns the local path (no copy for local)."""
    if not is_remote(uri):
        return local_path(uri)
    fs, path = resolve(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def ray_storage(uri: str) -> tuple[str, Optional[pafs.FileSystem]]:
    """(storage_path, storage_filesystem) for ray.train.RunConfig."""
    if not is_remote(uri):
        return local_path(uri), None
    fs, path = resolve(uri)
    return path, fs
