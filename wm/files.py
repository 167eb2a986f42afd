"""Output files: checked before a run starts, written atomically while it runs.

Every file a script writes (checkpoints, rollouts, metrics, plots, scores) goes
through `write_atomically`, so a kill at any moment leaves the previous
version of the file whole; every output folder is checked by
`writable_folder` (or `writable_file`) before the long work starts, so that a
folder that cannot be written is one line in the first second rather than a
traceback hours later.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from wm.cli import fail


def temporary_path(path: Path, pid: int | str) -> Path:
    """Where process `pid` writes `path` before renaming it: a hidden file in the
    same folder that keeps the suffix, which np.savez, savefig and PIL read the
    format from (`ckpt/vae.pt` -> `ckpt/.vae.1234.tmp.pt`)."""
    return path.with_name(f".{path.stem}.{pid}.tmp{path.suffix}")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` writes the file under a temporary name in the same folder,
    which is then renamed to `path`. An error or Ctrl-C removes the temporary
    file; one left by a killed process (SIGKILL, power loss) is removed by the
    next write of the same file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = temporary_path(path, os.getpid())
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if disk_full(e, path.parent):
            raise fail(f"no space left on the disk of {path.parent} to write {path.name}; free some space "
                       f"and run the command again ({path.name} there is as it was)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a write failed for want of space: ENOSPC, or (torch.save says
    only "unexpected pos") under 1 MiB left on the folder's disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


@contextmanager
def folder_lock(folder: str | os.PathLike, flag: str):
    """One run at a time per output folder: `folder/.lock` holds the pid of
    the run that writes there. A second run is refused in one line naming
    it; a lock whose process is gone (a kill) is taken over. The pid is
    written before the file appears (a link of a finished file), so no run
    ever reads a lock without one. A folder the run made and left empty (it
    stopped on bad input) is removed with the lock."""
    made = not Path(folder).exists()
    folder = writable_folder(folder, flag)
    lock = folder / ".lock"
    mine = temporary_path(lock, os.getpid())
    mine.write_text(str(os.getpid()))
    try:
        while True:
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                try:
                    pid = int(lock.read_text())
                except (OSError, ValueError):
                    pid = 0
                if pid and alive(pid):
                    raise fail(f"{flag} {folder} is in use by another run (process {pid}); wait for it to "
                               f"end, or give another {flag}") from None
                lock.unlink(missing_ok=True)  # its run is gone
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)
        if made and not any(folder.iterdir()):
            folder.rmdir()


def locked(field: str, flag: str):
    """Decorate a script's `main(cfg)` to hold `folder_lock` on the folder
    in `cfg.<field>` while it runs."""
    def wrap(main):
        @functools.wraps(main)
        def run(cfg):
            with folder_lock(getattr(cfg, field), flag):
                return main(cfg)
        return run
    return wrap


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of `path` whose writing process is gone. Those
    of a live process are left alone: another run may be writing this file."""
    name = re.compile(re.escape(f".{path.stem}.") + r"(\d+)" + re.escape(f".tmp{path.suffix}"))
    for tmp in path.parent.iterdir():
        m = name.fullmatch(tmp.name)
        if m and not alive(int(m[1])):
            tmp.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def link(target: str | os.PathLike, folder: Path) -> None:
    """folder/<target's name> -> target, relative, so the folder can move with
    the tree; a file or live link already there is kept, a dangling one (its
    target moved) replaced."""
    path = folder / Path(target).name
    if path.is_symlink() and not path.exists():
        path.unlink()
    if not path.exists():
        path.symlink_to(os.path.relpath(Path(target).resolve(), folder.resolve()))


def writable_folder(folder: str | os.PathLike, flag: str) -> Path:
    """Create the output folder that `flag` names and check that a file can be
    written in it, or fail with one line."""
    folder = Path(folder)
    problem = _unwritable(folder)
    if problem:
        raise fail(f"cannot write to {flag} {folder} ({problem}); pass a writable folder")
    return folder


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """The same for an output file that `flag` names: its folder."""
    path = Path(path)
    problem = f"{path} is a folder" if path.is_dir() else _unwritable(path.parent)
    if problem:
        raise fail(f"cannot write {flag} {path} ({problem}); pass another path")
    return path


def _unwritable(folder: Path) -> str | None:
    """Why no file can be written in `folder` (created if missing), or None."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a probe that leaves nothing behind
    except OSError as e:
        return e.strerror or str(e)
    return None
