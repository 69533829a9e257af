"""Writing outputs so that a failure never leaves a half-written or mixed one behind.

``atomic_path`` replaces one file atomically. ``OutputFolder`` writes a whole folder of files (an
export or a training run) as one unit: every file goes into a hidden staging folder inside the
target, and only when all are written are they renamed into place one by one, the file that
records the others' digests last (the ONNX file; a run's ``recipe.json``). The target itself is
never renamed: it may be a mount point or a symbolic link. A failed run, a full disk or a kill
before the renames leaves the previous files exactly as they were, plus at most one clearly named
staging folder, which the next run removes (and says so); a kill between two renames leaves a
folder whose digests no longer match, which every reader refuses (``runtime.folder.check_folder``,
``runtime.state.ScaleState.load``) until the next run. A lock file keeps two runs from writing
the same folder at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from runtime.errors import SasqError

STAGE_TAG, LOCK_TAG = ".sasq-stage-", ".sasq-lock"
KILL_ENV = "SASQ_TEST_KILL_AT"  # tests: SIGKILL this process at the named checkpoint
PAUSE_ENV = "SASQ_TEST_PAUSE_AT"  # tests: "stage:seconds", sleep there (holding whatever is held)


def checkpoint(stage: str) -> None:
    """A point where tests kill the process (``SASQ_TEST_KILL_AT=stage``), to prove that a kill at
    any stage leaves the previous output intact, or pause it (``SASQ_TEST_PAUSE_AT=stage:seconds``),
    to run a second command meanwhile."""
    if os.environ.get(KILL_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)
    name, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if name == stage:
        time.sleep(float(seconds or 1))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: Path, directory: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would (``mkstemp`` and ``mkdtemp``
    make them private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically,
    on any failure it is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        normal_mode(tmp_path)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (32 hex digits): what a folder's manifest records of each file."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def parse_json(text: str | bytes):
    """``json.loads`` for a file a user hands us: a value nested deeper than the parser's recursion
    allows is a ``json.JSONDecodeError`` like any other malformed text (which callers turn into
    their one-line error), not a ``RecursionError``."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested deeper than the JSON parser allows", text if isinstance(text, str) else "", 0) from None


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- a folder as one unit ----------------------------------------------------------------------


class FolderBusyError(SasqError):
    """Another run holds the folder's lock."""


_HELD: dict[str, list[int]] = {}  # lock file -> [fd, holders in this process]


@contextlib.contextmanager
def folder_lock(lock: Path, folder: Path) -> Iterator[None]:
    """Hold ``lock`` (an flock, dropped by the kernel even when the process is killed) for
    writing ``folder``; re-entrant within one process, so a command can lock its output folder
    before a long training run and the writer below it locks it again. The last holder removes
    the lock file (still holding it); a run that locked a file removed meanwhile tries again."""
    import fcntl

    key = str(lock.absolute())
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderBusyError(f"another sasq run is writing {folder} (it holds {lock}): wait for it to finish, "
                                      "or write elsewhere") from None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by the run that held it: lock the new one
        else:
            raise FolderBusyError(f"another sasq run is writing {folder}: wait for it to finish, or write elsewhere")
        _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        held = _HELD[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(held[0])  # closing drops the flock


def preflight(folder: str | os.PathLike) -> None:
    """Fail before any work on an output folder that cannot be written: a path part that is a
    file, a name longer than the file system allows, a read-only file system."""
    folder = Path(folder).absolute()
    for part in folder.parts[1:]:
        if len(os.fsencode(part)) > 255:
            raise SasqError(f"the name {part[:40]}... in {folder} is {len(os.fsencode(part))} bytes; file systems allow "
                            "255: use a shorter path")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SasqError(f"{existing} is a file, so {folder} cannot be a folder: choose another output path")
    try:
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        readonly = False
    if readonly:
        raise SasqError(f"{existing} is on a read-only file system: write elsewhere")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SasqError(f"no permission to write in {existing}: check its permissions, or write elsewhere")


def device_of(path: Path) -> Path:
    """The mount point of the file system ``path`` (or its nearest existing parent) is on."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """The bytes an unprivileged user may still write on ``path``'s file system."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


class NoSpaceError(SasqError):
    """The output does not fit on its file system (the previous output is left as it was)."""


def no_space(folder: Path, need: int, at_least: bool = False) -> NoSpaceError:
    """``at_least``: ``need`` is what was written when the disk filled, not the whole output."""
    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB" if n >= 1e7 else f"{n / 1e6:.2f} MB"

    free = free_bytes(folder)
    have = "" if free is None else f", {mb(free)} free"
    needed = f"more than {mb(need)} needed" if at_least else f"about {mb(need)} needed"
    return NoSpaceError(f"no space left on {device_of(folder)} (writing {folder}): {needed}{have}; the previous files "
                        "there are as they were: free some space or write elsewhere")


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class OutputFolder:
    """Write the files of one output into ``folder`` as a unit (see the module docstring).

    Every file is written into a hidden staging folder *inside* ``folder``, and only when all are
    written are they renamed into place one by one, ``last`` (the ONNX file, whose digests tie the
    others to it) last; files of a previous output (``own_files``) that this one does not write are
    removed after it. The folder itself is never renamed, so it may be a mount point (a USB stick, a
    Docker or Kubernetes volume) or a symbolic link, which stays a link. ``remove`` names files of
    another output to delete with the commit (``--overwrite``). ``need``: the bytes the output will
    take, checked against the space free before anything is written. Messages about stale staging
    folders go to ``report`` (stderr by default).
    """

    def __init__(self, folder: str | os.PathLike, own_files: Iterable[str] = (), last: str | None = None,
                 report=None, need: int | None = None, remove: Iterable[str] = ()) -> None:
        self.folder = Path(folder).absolute()
        self.own = set(own_files)
        self.last = last
        self.need = need
        self.remove = set(remove)
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stage: Path | None = None
        self._lock: contextlib.ExitStack | None = None
        self._created = False
        self.removed: list[str] = []

    # --- lock --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The folder's lock (``FOLDER/.sasq-lock``), to hold around a whole command (``with
        unit.lock(): ... with unit: ...``). It creates the folder, and removes it again where the
        command wrote nothing into it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise SasqError(f"{self.folder} is a file, not a folder: choose another output path")
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self._created = True
        try:
            with folder_lock(self.folder / LOCK_TAG, self.folder):
                yield
        finally:
            if self._created and self.folder.is_dir() and not any(self.folder.iterdir()):
                with contextlib.suppress(OSError):
                    self.folder.rmdir()

    def _clean_stale(self) -> None:
        """Remove the staging folders a killed run left (we hold the lock, so none is in use)."""
        for p in sorted(self.folder.iterdir()):
            if p.is_dir() and not p.is_symlink() and p.name.startswith(STAGE_TAG):
                shutil.rmtree(p, ignore_errors=True)
                self.removed.append(p.name)
                self.report(f"removed {p} (left by a run that did not finish)")

    # --- the unit --------------------------------------------------------------------------

    def __enter__(self) -> Path:
        """Lock, clean up after killed runs, check the space, and return the staging folder to
        write every file into."""
        preflight(self.folder)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(self.lock())
        try:
            self._clean_stale()
            free = free_bytes(self.folder)
            if self.need is not None and free is not None and self.need > free:
                raise no_space(self.folder, self.need)
            self.stage = Path(tempfile.mkdtemp(prefix=STAGE_TAG, dir=self.folder))
            normal_mode(self.stage, directory=True)
        except BaseException:
            self._lock.close()
            raise
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and self.stage is not None:
                staged = _tree_bytes(self.stage) if self.stage.exists() else 0
                raise no_space(self.folder, max(self.need or 0, staged), at_least=True) from None
        finally:
            if self.stage is not None and self.stage.exists():
                shutil.rmtree(self.stage, ignore_errors=True)
            if self._lock is not None:
                self._lock.close()

    def _commit(self) -> None:
        assert self.stage is not None
        for p in self.stage.rglob("*"):
            normal_mode(p, directory=p.is_dir())
        checkpoint("commit")
        names = sorted(p.name for p in self.stage.iterdir())
        if self.last in names:
            names.remove(self.last)
            names.append(self.last)
        for name in names:
            dst = self.folder / name
            if dst.is_dir() and not dst.is_symlink() and not (self.stage / name).is_dir():
                raise SasqError(f"{dst} is a folder: remove it or write elsewhere")
            if (self.stage / name).is_dir() and dst.exists():  # a folder of the output (a TensorRT cache)
                shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
            os.replace(self.stage / name, dst)
            if name == names[len(names) // 2]:
                checkpoint("commit-half")
        # what a previous output of this kind left and this one did not write, and what --overwrite replaces
        for name in sorted((self.own - set(names)) | self.remove):
            old = self.folder / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            elif old.exists() or old.is_symlink():
                old.unlink()
