"""Writing outputs so that a failure never leaves a half-written or mixed one behind.

``atomic_path`` replaces one file atomically. ``OutputFolder`` writes a whole folder of files (an
export or a training run) as one unit: every file goes into a staging folder beside the target,
and only when all are written does the staging folder take the target's place, in one
``rename``. A failed or killed run leaves the previous folder exactly as it was, plus at most one
clearly named staging folder, which the next run removes (and says so). A lock file keeps two runs
from writing the same folder at once.

Where the target cannot be swapped as a whole (it is the working directory, or it holds files
this tool did not write), the files are staged the same way and then moved in one by one, the
ONNX file last; a folder left half-replaced by a kill is then caught by the file digests the ONNX
file records (``runtime.folder.check_folder``).
"""

from __future__ import annotations

import contextlib
import ctypes
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

STAGE_TAG, OLD_TAG, LOCK_TAG = ".sasq-stage-", ".sasq-old-", ".sasq-lock"
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


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- a folder as one unit ----------------------------------------------------------------------


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class FolderBusyError(SasqError):
    """Another run holds the folder's lock."""


_HELD: dict[str, list[int]] = {}  # lock file -> [fd, holders in this process]


@contextlib.contextmanager
def folder_lock(lock: Path, folder: Path) -> Iterator[None]:
    """Hold ``lock`` (an flock, dropped by the kernel even when the process is killed) for
    writing ``folder``; re-entrant within one process, so a command can lock its output folder
    before a long training run and the writer below it locks it again."""
    import fcntl

    key = str(lock.absolute())
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(f"another sasq run is writing {folder} (it holds {lock}): wait for it to finish, "
                                  "or write elsewhere") from None
        _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        held = _HELD[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            os.close(held[0])  # closing drops the flock; the empty lock file stays for the next run


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


class OutputFolder:
    """Write the files of one output into ``folder`` as a unit (see the module docstring).

    ``own_files`` names the files a previous run of the same kind may have left in ``folder``;
    a folder holding anything else is not swapped as a whole but filled file by file. ``last`` is
    the file moved in last in that mode (the ONNX file, whose digests tie the others to it).
    Messages about stale staging folders go to ``report`` (stderr by default).
    """

    def __init__(self, folder: str | os.PathLike, own_files: Iterable[str] = (), last: str | None = None,
                 report=None) -> None:
        self.folder = Path(folder).absolute()
        self.own = set(own_files)
        self.last = last
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stage: Path | None = None
        self.whole = True
        self._lock: contextlib.ExitStack | None = None
        self.removed: list[str] = []

    # --- mode and lock ---------------------------------------------------------------------

    def _swappable(self) -> bool:
        """Whether the folder can be replaced as a whole: not the working directory or above it,
        and holding nothing but files of a previous output (and our own hidden leftovers)."""
        try:
            cwd = Path.cwd().resolve()
        except OSError:
            cwd = None
        real = self.folder.resolve()
        if cwd is not None and (cwd == real or real in cwd.parents):
            return False
        if not self.folder.exists():
            return True
        if not self.folder.is_dir():
            raise SasqError(f"{self.folder} is a file, not a folder: choose another output path")
        entries = [p.name for p in self.folder.iterdir()]
        return all(name in self.own or name.startswith(".") and (STAGE_TAG in name or LOCK_TAG in name)
                   for name in entries)

    def lock(self) -> contextlib.AbstractContextManager:
        """The folder's lock, to hold around a whole command (``with unit.lock(): ... with unit: ...``)."""
        self.whole = self._swappable()
        path = (self.folder.parent / f".{self.folder.name}{LOCK_TAG}") if self.whole else (self.folder / LOCK_TAG)
        return folder_lock(path, self.folder)

    def _clean_stale(self) -> None:
        """Remove the staging folders a killed run left (we hold the lock, so none is in use);
        put back a previous folder a killed swap left aside."""
        if self.whole:
            base, stage, old = self.folder.parent, f".{self.folder.name}{STAGE_TAG}", f".{self.folder.name}{OLD_TAG}"
        else:
            base, stage, old = self.folder, STAGE_TAG, None
        if not base.is_dir():
            return
        for p in sorted(base.iterdir()):
            if not p.is_dir():
                continue
            if p.name.startswith(stage):
                shutil.rmtree(p, ignore_errors=True)
                self.removed.append(p.name)
                self.report(f"removed {p} (left by a run that did not finish)")
            elif old is not None and p.name.startswith(old):
                if not self.folder.exists():
                    os.rename(p, self.folder)
                    self.report(f"restored {self.folder} from {p.name} (a run was killed while replacing it)")
                else:
                    shutil.rmtree(p, ignore_errors=True)
                    self.removed.append(p.name)
                    self.report(f"removed {p} (left by a run that did not finish)")

    # --- the unit --------------------------------------------------------------------------

    def __enter__(self) -> Path:
        """Lock, clean up after killed runs, and return the staging folder to write every file into."""
        preflight(self.folder)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(self.lock())
        try:
            self._clean_stale()
            if self.whole:
                self.folder.parent.mkdir(parents=True, exist_ok=True)
                stage = tempfile.mkdtemp(prefix=f".{self.folder.name}{STAGE_TAG}", dir=self.folder.parent)
            else:
                stage = tempfile.mkdtemp(prefix=STAGE_TAG, dir=self.folder)
            self.stage = Path(stage)
            normal_mode(self.stage, directory=True)
        except BaseException:
            self._lock.close()
            raise
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
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
        if self.whole:
            if not self.folder.exists():
                os.rename(self.stage, self.folder)
            elif _exchange(self.stage, self.folder):
                pass  # self.stage now holds the previous folder, removed in __exit__
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}{OLD_TAG}", dir=self.folder.parent))
                os.rmdir(old)
                os.rename(self.folder, old)
                os.rename(self.stage, self.folder)
                shutil.rmtree(old, ignore_errors=True)
            return
        names = sorted(p.name for p in self.stage.iterdir())
        if self.last in names:
            names.remove(self.last)
            names.append(self.last)
        for name in names:
            dst = self.folder / name
            if dst.is_dir() and not (self.stage / name).is_dir():
                raise SasqError(f"{dst} is a folder: remove it or write elsewhere")
            os.replace(self.stage / name, dst)
