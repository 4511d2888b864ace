"""Atomic file writes: write a temporary file beside the target, fsync, then rename over it.

A reader (or a crash) never sees a half-written file: either the old content or the new one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".rp-", ".tmp"  # every temporary robustprune writes: ``.rp-<8 random>.tmp``


def is_temporary(name: str) -> bool:
    """Is ``name`` one of our write temporaries (a write in flight, a probe, or what a killed writer left)?"""
    return re.fullmatch(r"\.rp-[^/]{8}\.tmp", name) is not None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; on success it is fsync'ed and renamed to ``path``.

    The temporary name is short and fixed-length (``.rp-<8 random>.tmp``), so any legal target name (up to 255
    characters) works, and it matches the stale-temporary glob ``.*.tmp`` a resumed run clears."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as err:  # name the file asked for, not the random temporary name
        raise OSError(err.errno, err.strerror, str(path)) from err
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)  # mkstemp (and some writers) make the file private; give it an ordinary file's mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:  # Rust writers (safetensors) wrap EFBIG / ENOSPC as "... (os error 27)" in their own type
        found = None if isinstance(err, (OSError, ValueError)) else re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite number (a diverged loss, the compression of an all-zero model)
    becomes null, in nested dicts too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """One JSON line, flushed and fsync'ed (appending keeps earlier lines intact); strict JSON, null for non-finite
    numbers (:func:`finite`)."""
    data = memoryview((json.dumps(finite(record), allow_nan=False) + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:  # unbuffered, so nothing is left to flush after a failure
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError:  # disk full mid-line: cut the partial line off so every line stays valid JSON
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
