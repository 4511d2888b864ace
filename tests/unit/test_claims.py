"""Claims on units of work (``infra/claims.py``): one holder at a time, even when processes race for the same
claims; a live claim is kept by its heartbeat; a dead worker's claim is broken (at once when it names a process of
this machine that is gone, after STALE_S otherwise); breaking never removes a fresh claim."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

from robustprune.infra import claims


def _race(folder: str, count: int, hold_s: float, queue, start) -> None:
    """Do every unit not done yet, as ``run_task`` does: claim, look for the result, work, write it, release.
    Holding is marked with an O_EXCL file, so two simultaneous holders would collide there."""
    won, overlaps = [], []
    start.wait(timeout=120)  # all at once: a spawned process still importing would find every unit done
    for i in range(count):
        claim = claims.try_claim(Path(folder) / f"unit-{i}.claim")
        if claim is None:
            continue
        with claim:
            done, holding = Path(folder) / f"unit-{i}.done", Path(folder) / f"unit-{i}.holding"
            if done.exists():
                continue
            try:
                os.close(os.open(holding, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                overlaps.append(i)
            time.sleep(hold_s)
            done.write_text(str(os.getpid()))
            holding.unlink(missing_ok=True)
            won.append(i)
    queue.put((won, overlaps))


def test_processes_racing_for_the_same_claims_never_share_one(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue, start = context.Queue(), context.Barrier(6)
    workers = [context.Process(target=_race, args=(str(tmp_path), 60, 0.01, queue, start)) for _ in range(6)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    done = sorted(unit for won, _ in results for unit in won)
    assert [unit for _, overlaps in results for unit in overlaps] == [], "two processes held one claim at once"
    assert done == list(range(60)), "every unit done exactly once"
    assert sum(1 for won, _ in results if won) > 1, "test setup: the work should be shared"
    assert not list(tmp_path.glob("*.claim")), "every claim released"


def test_a_claim_is_exclusive_until_released(tmp_path):
    path = tmp_path / "u.claim"
    first = claims.try_claim(path)
    assert first is not None and claims.try_claim(path) is None
    assert claims.holder(path) == f"{os.uname().nodename} pid {os.getpid()}"
    first.release()
    assert not path.exists() and claims.holder(path) is None
    with claims.try_claim(path) as again:
        assert again is not None
    assert not path.exists()


def test_the_heartbeat_keeps_a_live_claim_fresh(tmp_path):
    path = tmp_path / "u.claim"
    with claims.try_claim(path, heartbeat_s=0.05):
        os.utime(path, (time.time() - 500, time.time() - 500))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 1.0
        assert claims.try_claim(path, stale_s=60) is None


def test_a_dead_workers_claim_is_broken(tmp_path):
    dead = tmp_path / "dead.claim"  # a process of this machine that no longer exists: broken at once
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    dead.write_text(json.dumps({"host": os.uname().nodename, "pid": process.pid, "started": time.time()}))
    claim = claims.try_claim(dead)
    assert claim is not None and claims.holder(dead).endswith(f"pid {os.getpid()}")
    claim.release()
    other = tmp_path / "other.claim"  # another machine's: only once its heartbeat is STALE_S old
    other.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
    assert claims.try_claim(other, stale_s=60) is None
    os.utime(other, (time.time() - 61, time.time() - 61))
    with claims.try_claim(other, stale_s=60) as taken:
        assert taken is not None
    assert not list(tmp_path.glob("*.break")) and not list(tmp_path.glob("*.claim"))


def test_breakers_take_turns(tmp_path):
    path = tmp_path / "u.claim"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    os.utime(path, (time.time() - 100, time.time() - 100))
    (tmp_path / "u.claim.break").write_text("")  # another worker is breaking it right now
    assert claims.try_claim(path, stale_s=60) is None and path.exists()
    os.utime(tmp_path / "u.claim.break", (time.time() - 100, time.time() - 100))  # that breaker died
    with claims.try_claim(path, stale_s=60) as taken:
        assert taken is not None
