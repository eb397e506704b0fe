"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically and verified on load.

A checkpoint is a folder `step_00001234/` holding one `<group>.safetensors` per tensor group
(model, ema, optimizer, ...) and `state.json` (config, step, metadata and the SHA-256 of every
tensor file). It is written into a temporary folder, every file fsynced, then renamed into place, so a
kill at any moment leaves either the old set of checkpoints or the new one, never a half file.
Loading never executes code: no pickle, only safetensors and JSON.

`folder_lock` keeps two runs from writing into one folder: `<folder>/.lock` holds the owner's pid and host,
and the owner holds an exclusive flock on it, which the kernel drops when the owner dies, so a lock left by a
killed run is taken over by the next one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["CheckpointError", "FolderInUseError", "folder_lock", "save_checkpoint", "load_checkpoint",
           "list_checkpoints", "latest_checkpoint",
           "prune_checkpoints", "optimizer_to_tensors", "optimizer_from_tensors", "atomic_write_text"]

STATE_FILE = "state.json"
PREFIX = "step_"
LOCK_FILE = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model it is loaded into."""


class FolderInUseError(CheckpointError):
    """Another live run holds the output folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by another user
        return True
    return True


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _in_use(folder: Path, path: Path, owner: dict) -> FolderInUseError:
    who = (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}" if owner
           else "a process that has not written its pid yet")
    return FolderInUseError(f"output folder {folder} is in use by another run ({who}; lock file {path}). Two runs "
                            "writing into one folder overwrite each other's checkpoints and logs: wait for that run, "
                            "stop it, or "
                            "choose another output folder")


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `<folder>/.lock` (the folder is created) while the block runs; raise FolderInUseError naming the
    folder and the owner's pid if another live process holds it. A lock file left by a dead process is taken over.

    The lock is an exclusive flock on the file (dropped by the kernel when its owner dies); the file records the
    owner's pid and host for the message. Where the file system has no flock, a lock file whose pid is alive
    on this host (or that names another host) counts as held.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            raise _in_use(folder, path, _owner(path)) from None
        except (OSError, ImportError) as e:   # no flock here (ENOLCK, EOPNOTSUPP, no fcntl): judge the recorded pid
            if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            owner = _owner(path)
            held = owner.get("host") != me["host"] or _pid_alive(int(owner["pid"])) if owner else False
            if owner and owner.get("pid") != me["pid"] and held:
                os.close(fd)
                raise _in_use(folder, path, owner) from None
        # the file may have been removed and re-created by its previous owner meanwhile: lock the one at `path`
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()   # while still holding the lock, so no one locks a file about to vanish
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via temp file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, groups: dict[str, dict[str, Tensor]], meta: dict) -> Path:
    """Write run_dir/checkpoints/step_<8-digit step> atomically and return its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    hashes = {}
    for name, tensors in groups.items():
        path = tmp / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        hashes[name] = _sha256(path)
    state = dict(meta, step=step, files=hashes)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step: replace the old folder
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def load_checkpoint(path: str | Path, groups: list[str] | None = None) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Read and verify a checkpoint folder. Returns ({group: tensors}, state dict)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}: incomplete or not a checkpoint")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is corrupted ({e})") from None
    files = state.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lists no tensor files")
    out = {}
    for name in groups if groups is not None else files:
        if name not in files:
            raise CheckpointError(f"checkpoint {path} has no tensor group {name!r}; it has {sorted(files)}")
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {file.name} is missing")
        if _sha256(file) != files[name]:
            raise CheckpointError(f"checkpoint {path}: {file.name} is corrupted or truncated (SHA-256 mismatch)")
        try:
            out[name] = load_file(str(file))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path}: {file.name} is not a valid safetensors file ({e})") from None
    return out, state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that loads and verifies, or None if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(path)
            return path
        except CheckpointError:
            continue
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and stale temporary folders from killed writes."""
    root = Path(run_dir) / "checkpoints"
    for stale in root.glob(f".tmp-{PREFIX}*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Split a torch optimizer state_dict into flat tensors and JSON-able param_groups."""
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_to_tensors`."""
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
