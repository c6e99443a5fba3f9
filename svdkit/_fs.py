"""Write folders atomically: build them beside the target and rename at the end, so a failure never
leaves a half-written result and never destroys what was there before.

Scratch folders beside a target are named `.NAME.KIND-PID-HOST-RANDOM` (KIND: `partial` for the folder being
built, `stage` for an intermediate result, `old` for the folder being replaced), so that the next save to the
same target can tell the leftovers of a killed run (its process is gone) from the folders of a run still going,
and remove them. Working folders (`Scratch`: a gradient pass's spilled inputs, the output-gradient Grams, a
sweep's models) are named the same way, `.svdkit.KIND-PID-HOST-RANDOM`, and every new one first removes those a
killed run left in the same place: for an 8B model they hold over 100 GB. Finished folders get the
permissions the umask gives, as `save_pretrained`'s do, not the owner-only ones of `tempfile.mkdtemp`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError, OutputError

log = logging.getLogger(__name__)

SCRATCH_KINDS = ("partial", "stage", "old", "spill", "grams", "out", "work")


def _host() -> str:
    """This machine's name with only the characters a scratch name allows (no '-')."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def scratch_dir(parent: str | os.PathLike, name: str, kind: str) -> Path:
    """Create `parent/.NAME.KIND-PID-HOST-RANDOM`, an empty folder owned by this process (see the module doc)."""
    if kind not in SCRATCH_KINDS:
        raise ValueError(f"scratch kind must be one of {SCRATCH_KINDS}, got {kind!r}")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-{_host()}-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot create a folder in {parent} ({e.strerror or e})") from None


def _owner_alive(rest: str) -> bool | None:
    """Whether the process that named a scratch folder (`PID-HOST-...` after its kind) still runs on this machine;
    None when that cannot be told (another machine: the folder is left alone)."""
    m = re.match(r"(\d+)-([A-Za-z0-9_.]+)-", rest)
    if m is None:
        return False  # written by a version that recorded no owner: a leftover
    pid, host = int(m.group(1)), m.group(2)
    if host != _host():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the scratch folders a killed run left beside `target` (theirs and those of its stages); returns
    them. Folders of a live process, or of another machine, are kept (the latter with a notice)."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    kinds = "|".join(SCRATCH_KINDS)
    pattern = re.compile(rf"^\.(\.?){re.escape(target.name)}\.({kinds})-(.*)$")
    removed, foreign = [], []
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink():
            continue
        alive = _owner_alive(m.group(3))
        if alive is None:
            foreign.append(entry.name)
        elif not alive:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    if removed:
        log.warning("removed %d unfinished folder(s) a killed run left beside %s: %s", len(removed), target,
                    ", ".join(p.name for p in removed))
    if foreign:
        log.info("left %d unfinished folder(s) of another machine beside %s: %s", len(foreign), target,
                 ", ".join(foreign))
    return removed


class Scratch:
    """A working folder of this process under `parent` (default: the system's temporary folder), removed by
    `cleanup()`, on leaving a `with` block, when garbage-collected or at exit; one a killed run left (its process
    gone, see the module doc) is removed by the next `Scratch` in the same place."""

    def __init__(self, kind: str, parent: str | os.PathLike | None = None, name: str = "svdkit") -> None:
        parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {parent} ({e.strerror or e})") from None
        remove_stale(parent / name)  # whatever a killed svdkit left here, of any kind
        self.path = scratch_dir(parent, name, kind)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), ignore_errors=True)

    def cleanup(self) -> None:
        self._finalizer()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.cleanup()


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux), else set and reset."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | os.PathLike) -> None:
    """Give `folder`, its subfolders and files the modes a plain `mkdir`/`open` would have (0777/0666 less the
    umask; executable files keep their execute bits), whatever the tools that wrote them chose."""
    mask = current_umask()
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            exe = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if exe else 0o666) & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` only if the block finishes without error.

    Leftovers of a killed save to the same target are removed first (one log line names them); the finished
    folder gets the umask's permissions."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is an existing file, not a folder")
    if target.exists() and not overwrite and any(target.iterdir()):
        raise OutputError(f"{target} already exists and is not empty (pass overwrite=True / --overwrite)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {target.parent} ({e.strerror or e})") from None
    remove_stale(target)
    tmp = scratch_dir(target.parent, target.name, "partial")
    try:
        yield tmp
        apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = scratch_dir(target.parent, target.name, "old")  # empty: a folder may be renamed onto it
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_space(folder: Path, need: int, what: str) -> None:
    """Refuse, before anything is computed or written, when `folder`'s disk has less than `need` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ConfigError(f"{what} need {need / 1e9:.1f} GB on disk at {folder}, which has {free / 1e9:.1f} GB "
                          "free: free some space, point the statistics cache (SVDKIT_CACHE) or TMPDIR at a larger "
                          "disk, or choose a method without them (adasvd)")
