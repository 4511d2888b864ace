"""Output locations: who made a folder (the marker), who writes it now (the lock), and whether it can be written at
all (the probe). Everything here is checked before any work, so a bad ``--out`` fails at once and never costs a file.

- **Marker** ``.robustprune`` (JSON: kind ``run`` | ``sweep``, robustprune version, created, config name, run id),
  written when robustprune creates a run or sweep folder. ``run --force`` replaces only a folder holding a ``run``
  marker; a folder without one (say, ``~``, or a run folder from before markers existed) is never deleted.
- **Lock** ``fcntl.flock`` (exclusive, non-blocking) on ``.robustprune.lock`` inside a run or sweep folder, held for
  the whole run / sweep / resume, and on a sibling ``.<name>.lock`` for a stage command's output file (``--out
  FILE``; the name is cut to 200 characters so the lock's own name stays legal). A second writer is refused at once
  with the holder's pid, host, command and start time, which the lock file records. The kernel drops an flock when
  its process dies, so a killed run never blocks its ``--resume``. Releasing removes the lock file; a writer that
  locked a file removed meanwhile opens the new one (``_same_file``), so two writers never hold two files of one name.
- **Probe**: creating and removing a temporary file finds a read-only folder or file system before any work (unlike
  ``os.access``, also where even root cannot write, such as ``/proc``).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from robustprune.infra.version import __version__
from robustprune.infra.errors import UserError
from robustprune.infra.fileio import TEMPORARY_PREFIX, TEMPORARY_SUFFIX, is_temporary, write_json

MARKER = ".robustprune"
LOCK = ".robustprune.lock"
RUN, SWEEP = "run", "sweep"
KINDS = (RUN, SWEEP)


def folder_name(name: str) -> str:
    """A config name as one safe path component (default folders ``runs/<name>-<time>``, ``sweeps/<name>``): only
    [A-Za-z0-9._-], no leading dot (``../x`` must not climb out of ``runs/``) or dash (not an option to a shell
    command), at most 100 characters, never empty."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip(".-")[:100]
    return safe or "unnamed"


def default_run_folder(name: str) -> Path:
    """``runs/<config name>-<YYYYmmdd-HHMMSS>``: where a run goes when no ``--out`` is given."""
    return Path("runs") / f"{folder_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------------------------------------- probe


def nearest_folder(path: Path, what: str) -> Path:
    """``path`` if it exists, else the nearest existing ancestor (where it will be created); it must be a folder."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise UserError(f"{what}: {candidate} exists and is not a folder")
            return candidate
    raise UserError(f"{what}: no existing folder above it")  # unreachable: "/" exists


def check_writable(folder: Path, what: str) -> None:
    """Create and remove a probe file in ``folder`` (a short name matching the stale-temporary glob ``.*.tmp``)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=folder)
    except OSError as err:
        raise UserError(f"{what}: cannot write in {folder} ({err.strerror})") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)  # a resuming run in this folder may have removed it already


# -------------------------------------------------------------------------------------------------------- lock


class FolderInUse(UserError):
    """Another live process holds the lock."""


class Lock:
    """An flock held by this process on ``path`` until ``release`` (a context manager: released on exit)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # removed while still held: nobody can lock this file any more
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(path: Path, what: str) -> Lock:
    """Lock ``path`` (created if missing) for this process, or refuse at once naming the process that holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a planted link: refused
        try:
            holder = None if _try_lock(fd) else _read_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        if holder is not None:
            os.close(fd)
            raise FolderInUse(_in_use(what, holder))
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder released (and removed) this file between our open and our lock: take the new one
    lock = Lock(path, fd)
    try:
        _write_holder(fd)
    except BaseException:
        lock.release()
        raise
    return lock


def lock_folder(folder: Path, what: str | None = None) -> Lock:
    return acquire(folder / LOCK, what or str(folder))


def lock_file(path: Path) -> Lock:
    """The lock of an output file: ``.<name>.lock`` beside it (cut so that a 255-character name still fits)."""
    return acquire(path.parent / f".{path.name[:200]}.lock", f"--out {path}")


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` exclusively, with a few quick tries: another process may hold it for a moment only (a check like
    ``_held``, or a writer about to record its name), and a writer is refused only for a lasting holder."""
    for attempt in range(3):
        if attempt:
            time.sleep(0.05)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
    return False


def _in_use(what: str, holder: str) -> str:
    return f"{what} is in use by another robustprune process ({holder}); wait for it to finish or stop it"


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv)[:300],
              "started": _now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded"


def _held(lock_path: Path) -> str | None:
    """The holder of ``lock_path`` if some process holds it, else None (touches nothing: no file is created)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return None if _try_lock(fd) else _read_holder(fd)  # closing drops our own lock again
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------------ marker


def read_marker(folder: Path) -> dict | None:
    """The folder's marker, or None where there is none (or it is not one of ours)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("kind") in KINDS else None


def write_marker(folder: Path, kind: str, config_name: str) -> None:
    write_json(folder / MARKER, {"kind": kind, "robustprune_version": __version__, "created": _now(),
                                 "config_name": config_name, "run_id": uuid.uuid4().hex})


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------- folders


def check_folder(out: Path, kind: str, *, force: bool = False, resume: bool = False) -> None:
    """May ``out`` become (or stay) a ``kind`` folder of this process? Read-only; refuses with UserError.

    A run folder is new or empty, or replaced (``force``: it must hold a run marker) or continued (``resume``); a
    sweep folder is new or empty, or a sweep folder (continued). A run folder in use is refused for that reason
    first; sweep commands share their folder (its lock guards a few writes only, and is waited for)."""
    holder = _held(out / LOCK) if out.is_dir() and kind != SWEEP else None
    if holder is None:
        try:
            _check_state(out, kind, force=force, resume=resume)
            return
        except UserError:
            # another writer may have created and claimed the folder since the first look: say so, not "not empty"
            holder = _held(out / LOCK) if out.is_dir() and kind != SWEEP else None
            if holder is None:
                raise
    raise UserError(_in_use(f"--out {out}", holder))


def _check_state(out: Path, kind: str, *, force: bool, resume: bool) -> None:
    what = f"--out {out}"
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} exists and is not a folder")
    if _contents(out):
        _check_existing(out, kind, force=force, resume=resume)
    check_writable(nearest_folder(out, what), what)


def _check_existing(out: Path, kind: str, *, force: bool, resume: bool) -> None:
    what = f"--out {out}"
    marker = read_marker(out)
    if marker is not None and marker["kind"] != kind:
        raise UserError(f"{what} is a robustprune {marker['kind']} folder, not a {kind} folder")
    if kind == SWEEP:
        if marker is None and not _old_sweep(out):
            raise UserError(f"{what} exists and is not a robustprune sweep folder (give a new or empty folder)")
    elif not resume and not force:
        raise UserError(f"{what} exists and is not empty (use --force to replace a robustprune run folder)")
    elif not resume and marker is None:
        old = ("; a run folder from before robustprune marked its folders: check it and delete it by hand"
               if (out / "config.yaml").is_file() else "")
        raise UserError(f"{what}: refusing to replace a folder that is not a robustprune run (no {MARKER} marker{old})")


def _old_sweep(out: Path) -> bool:
    """A sweep folder from before markers existed: its config and its points (continuing it only adds files)."""
    return (out / "config.yaml").is_file() and (out / "points").is_dir()


def _contents(out: Path) -> list[Path]:
    """What the folder holds besides a lock file (a killed writer leaves its lock file behind) and our temporaries:
    another command's marker write or writability probe in flight is not content (two sweep commands started together
    on a new folder would otherwise refuse each other), nor is a killed writer's leftover."""
    return [p for p in out.iterdir() if p.name != LOCK and not is_temporary(p.name)] if out.is_dir() else []


def claim_folder(out: Path, kind: str, config_name: str, *, force: bool = False, resume: bool = False) -> Lock:
    """Check, create and lock ``out`` for this process; ``force`` empties it first. A new (or emptied) folder gets
    the marker. The lock comes before any write or deletion and stays through them (the lock file is kept)."""
    check_folder(out, kind, force=force, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(out, f"--out {out}")
    try:
        _check_state(out, kind, force=force, resume=resume)  # again under the lock: the folder may have changed
        if force:
            _empty(out)
        if not _contents(out):
            write_marker(out, kind, config_name)
    except BaseException:
        lock.release()
        raise
    return lock


def _empty(out: Path) -> None:
    """Everything but the lock file, stale temporaries too (a probe another command removes first is no error)."""
    for path in out.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
