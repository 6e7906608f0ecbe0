"""Checkpoints: written atomically, found again by step, and loaded without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values (so ``torch.load(..., weights_only=True)`` reads it):
model (with the quantizer's codebook and EMA buffers), optimizer, scheduler, step, config and RNG states, plus
whatever else the trainer adds.
"""

from __future__ import annotations

import os
import random
import re
import socket
from pathlib import Path

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
# save_checkpoint's temporary files: ".<name>.pt.<host>.<pid>.tmp"
TMP_PATTERN = re.compile(r"^\.(?P<target>.+?\.pt)\.(?P<host>.+)\.(?P<pid>\d+)\.tmp$")
BEST_NAME = "best.pt"


class CheckpointError(RuntimeError):
    pass


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:07d}.pt"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over ``path``.

    The rename is atomic on POSIX and Windows, so a reader (or a run resumed after a crash) sees either the old
    file or the complete new one, never a torn write. The folder is fsynced too, so the rename survives a power
    cut.
    """
    path = Path(path)
    # the writer's host and pid in the name tell a later run whether the writer is dead (remove_stale_temporaries)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in ``run_dir``, oldest first. Temporary files are not listed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """Delete the temporary files of checkpoint writers that died mid-write (a SIGKILL skips save_checkpoint's
    clean-up), and return (removed, kept).

    A writer is dead when no process of its pid is alive on this host. A live pid keeps its file, whether it is
    still that writer or (after pid reuse) another process such as a torchrun rank: a leaked file is harmless, a
    removed one under a live writer fails its save. A file written on another host (a run folder on a shared
    file system) is kept too, since its pid says nothing here. Call it before this process writes any checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return [], []
    removed, kept = [], []
    host = socket.gethostname()
    for path in sorted(run_dir.iterdir()):
        m = TMP_PATTERN.match(path.name)
        if m is None:
            continue
        written_here = m.group("host") == host
        if written_here and not _process_alive(int(m.group("pid"))):
            path.unlink(missing_ok=True)
            removed.append(path)
        else:
            kept.append(path)
    return removed, kept


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _process_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive, keep the file
    try:
        os.kill(pid, 0)  # signal 0: only the existence and permission checks
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform lets a folder be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
