"""Claims on units of work in a shared folder: the one coordination between sweep workers, whatever started them
(local processes, Ray tasks, Slurm jobs on other machines, a second sweep command).

A claim is a file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS v3+), holding who made
it. While the work runs, a daemon thread touches it every ``HEARTBEAT_S`` seconds. A claim whose file has not been
touched for ``STALE_S`` seconds belongs to a worker that died (or lost its machine) — at once if the claim names a
process of this machine that no longer exists: the next worker breaks it (the
breakers take turns through a second O_EXCL file, and look again once it is their turn) and claims the work again.
A worker paused for longer than ``STALE_S`` (SIGSTOP) loses its claim and may finish a unit another worker redid;
both write the same result atomically. Flocks are not
used here because a killed Slurm node's locks outlive it on some cluster file systems, and a heartbeat does not.

The work's result is written atomically by the worker (``fileio.write_json``) before the claim is released, so a
finished unit is never recomputed and a unit is never run by two live workers at once.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_S = 10.0  # how often a live claim is touched
STALE_S = 90.0  # an untouched claim this old is a dead worker's


class Claim:
    """A held claim on ``path``; touched by a heartbeat thread until ``release`` (a context manager)."""

    def __init__(self, path: Path, heartbeat_s: float):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"claim {path.name}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # broken by another worker after a pause longer than STALE_S: stop touching it
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_claim(path: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> Claim | None:
    """Claim ``path`` for this process, or None while a live worker holds it. A stale claim is broken first."""
    for _ in range(3):  # a claim released or broken meanwhile is tried again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _break_if_stale(path, stale_s) and path.exists():
                return None
            continue
        with os.fdopen(fd, "w") as file:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, file)
        return Claim(path, heartbeat_s)
    return None


def _break_if_stale(path: Path, stale_s: float) -> bool:
    """Remove ``path`` if untouched for ``stale_s`` seconds (True). Breakers take turns through ``<path>.break``
    (itself an O_EXCL file), and look again under it: two breakers never remove a claim the first one just made."""
    if not _stale(path, stale_s):
        return False
    turn = path.with_name(path.name + ".break")
    if _stale(turn, stale_s):  # a breaker died between its two steps (seconds apart): its turn is over
        turn.unlink(missing_ok=True)
    try:
        os.close(os.open(turn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False  # another worker is breaking it now; the work is theirs
    try:
        if _stale(path, stale_s):
            path.unlink(missing_ok=True)
        return True
    finally:
        turn.unlink(missing_ok=True)


def _stale(path: Path, stale_s: float) -> bool:
    """Untouched for ``stale_s`` seconds, or made by a process of this machine that no longer exists."""
    try:
        if time.time() - path.stat().st_mtime >= stale_s:
            return True
        info = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return False
    except ValueError:  # being written (a claim's content follows its creation): young, so alive
        return False
    return info.get("host") == socket.gethostname() and not _alive(info.get("pid"))


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: trust the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def holder(path: Path) -> str | None:
    """Who holds ``path`` ("host pid N"), or None when it is free."""
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return f"{info.get('host')} pid {info.get('pid')}"
