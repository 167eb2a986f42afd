"""Output files, written atomically.

Every file a script writes (checkpoints, rollouts, metrics, plots, scores) goes
through `write_atomically`, so a kill at any moment leaves the previous
version of the file whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable


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
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of `path` whose writing process is gone. Those
    of a live process are left alone: another run may be writing this file."""
    name = re.compile(re.escape(f".{path.stem}.") + r"(\d+)" + re.escape(f".tmp{path.suffix}"))
    for tmp in path.parent.iterdir():
        m = name.fullmatch(tmp.name)
        if m and not _alive(int(m[1])):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
