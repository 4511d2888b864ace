"""Safe extraction of a ``.tar.gz`` archive into a folder.

Every member is checked *before* anything is written: absolute names, ``..``, names resolving outside the target,
links, devices and FIFOs are refused with a :class:`UserError`. Only regular files and folders are extracted, with
``tarfile``'s ``filter="data"`` as a second guard, into a temporary folder inside the target; a caller's ``check``
sees that folder (e.g. to verify checksums) before its entries are moved into place, so an interrupted or refused
extraction leaves nothing half-written.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable

from robustprune.infra.errors import UserError, one_line
from robustprune.infra.fileio import fsync_folder


def extract_tar_gz(archive: Path, folder: Path, check: Callable[[Path], None] = lambda staging: None) -> None:
    """Check every member, extract into a temporary folder, ``check(staging)``, then move into ``folder``.

    Raises UserError for a refused member (nothing extracted) and tarfile / zlib / EOF errors for a corrupt archive.
    """
    with tarfile.open(archive, "r:gz") as tar:
        safe = [_checked_member(m, folder, archive) for m in tar.getmembers()]
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
        try:
            _extract_all(tar, staging, safe)
            check(staging)
            _move_into_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _checked_member(member: tarfile.TarInfo, folder: Path, archive: Path) -> tarfile.TarInfo:
    """The member if it is a plain file or folder that stays inside ``folder``; else a UserError (path traversal)."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise UserError(f"{archive}: refusing to extract: member {name!r} has an absolute path")
    if ".." in path.parts or ".." in name.split("\\"):
        raise UserError(f"{archive}: refusing to extract: member {name!r} contains '..'")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{archive}: refusing to extract: member {name!r} is {_kind(member)} "
                        "(only plain files and folders are extracted)")
    target = (folder / name).resolve()
    if target != folder.resolve() and not target.is_relative_to(folder.resolve()):
        raise UserError(f"{archive}: refusing to extract: member {name!r} resolves outside {folder}")
    return member


def _kind(member: tarfile.TarInfo) -> str:
    """How to name a member that is neither a plain file nor a folder, for the refusal message."""
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "a device"
    return "a FIFO" if member.isfifo() else f"of unsupported type {member.type!r}"


def _extract_all(tar: tarfile.TarFile, staging: Path, members: list[tarfile.TarInfo]) -> None:
    """Extract the checked members; ``filter="data"`` (Python >= 3.11.4 / 3.12) re-checks them and drops modes."""
    if hasattr(tarfile, "data_filter"):
        try:
            tar.extractall(staging, members=members, filter="data")
        except tarfile.FilterError as exc:
            raise UserError(f"refusing to extract: {one_line(exc)}") from None
    else:  # pragma: no cover - older Python: our own checks above are the guard
        tar.extractall(staging, members=members)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Swap each extracted top-level entry in; an old copy is moved aside into ``staging`` and deleted with it."""
    for entry in sorted(p for p in staging.iterdir()):
        dest = folder / entry.name
        if dest.exists() or dest.is_symlink():
            os.replace(dest, staging / f".old-{entry.name}")
        os.replace(entry, dest)
    fsync_folder(folder)
