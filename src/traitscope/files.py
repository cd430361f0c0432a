"""Files that are whole or absent: every write goes to a temporary name and is renamed into place, so
a kill, a crash or a full disk never leaves a half-written file under its final name."""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from traitscope.errors import TraitscopeError


@contextlib.contextmanager
def folder_lock(dpath: Path, command: str, lock_name: str = ".lock"):
    """One writer per folder: while the body runs, a second `folder_lock` on `dpath` (from any process)
    fails at once with a clear line naming `command` (e.g. 'traitscope train'). The lock is the kernel's
    (flock), so a killed writer never leaves the folder locked. A folder that is replaced whole takes
    its lock in its parent, under `lock_name`."""
    dpath = Path(dpath)
    lock_fpath = dpath / lock_name
    lock_fpath.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_fpath, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        where = dpath if lock_name == ".lock" else dpath / lock_name.strip(".").removesuffix(".lock")
        raise TraitscopeError(f"another `{command}` run is writing {where}; wait for it to end") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_fpath.unlink()
        f.close()


def check_out_dpath(dpath: str | Path, flag: str = "--out") -> Path:
    """`dpath` as a Path, refused in one line when it (or a folder above it) is a file: an output
    folder is created, never written over a file."""
    dpath = Path(dpath).expanduser()
    for p in (dpath, *dpath.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == dpath else f"is inside {p}, which is a file"
                raise TraitscopeError(f"{flag} {dpath} {where}; give a folder")
            break
    return dpath


def file_sha256(fpath: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tmp_name(fpath: Path) -> Path:
    """Where a file is written before it is renamed to its final name."""
    return fpath.with_name(fpath.name + ".tmp")


def unlink_quietly(fpath: Path) -> None:
    try:
        fpath.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def atomic_open(fpath: Path, mode: str = "w", **kwargs):
    """`open` for writing, under a temporary name: the file takes its final name, fsynced, only when
    the body ends without error (a CSV writer, `fig.savefig(f)`, `image.save(f, format=...)`)."""
    tmp_fpath = tmp_name(Path(fpath))
    try:
        with open(tmp_fpath, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_fpath, fpath)
    except BaseException:
        unlink_quietly(tmp_fpath)
        raise


@contextlib.contextmanager
def atomic_folder(dpath: Path):
    """Build a folder under `<dpath>.partial` (yielded) and rename it to `dpath` when the body ends
    without error: a failed or killed build never leaves a half-made `dpath`. `dpath` may exist only
    as an empty folder (the caller refuses anything else)."""
    part_dpath = dpath.with_name(dpath.name + ".partial")
    shutil.rmtree(part_dpath, ignore_errors=True)
    try:
        yield part_dpath
        dpath.parent.mkdir(parents=True, exist_ok=True)
        if dpath.exists():
            dpath.rmdir()
        part_dpath.rename(dpath)
    except BaseException:
        shutil.rmtree(part_dpath, ignore_errors=True)
        raise


def atomic_write_bytes(fpath: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename: a half-written file never has the final name."""
    with atomic_open(fpath, "wb") as f:
        f.write(data)


def atomic_save_npy(fpath: Path, array: np.ndarray) -> None:
    with atomic_open(fpath, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def atomic_save_safetensors(fpath: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, written under a temporary name and renamed into place."""
    tmp_fpath = tmp_name(fpath)
    try:
        save_file(tensors, str(tmp_fpath), metadata=metadata)
        with open(tmp_fpath, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_fpath, fpath)
    except BaseException:
        unlink_quietly(tmp_fpath)
        raise


def atomic_write_json(fpath: Path, obj) -> None:
    atomic_write_bytes(fpath, (json.dumps(obj, indent=2) + "\n").encode())


def truncate_log(fpath: Path, last_step: int) -> None:
    """Keep the lines of a JSON-lines log up to `last_step` (a resumed run redoes the steps after its
    checkpoint); a line torn by a kill in the middle of writing it is dropped too."""
    if fpath.is_file():
        lines = [line for line in fpath.read_text().splitlines() if _logged_step(line) <= last_step]
        atomic_write_bytes(fpath, "".join(line + "\n" for line in lines).encode())


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def read_json(fpath: Path, fix: str = "", kind: type = dict):
    """An artefact's JSON, checked to be a `kind` (dict or list). A missing, unreadable or damaged file
    is a TraitscopeError that names it and says `fix` (what to do about it)."""
    fix = f"; {fix}" if fix else ""
    try:
        text = Path(fpath).read_text()
    except FileNotFoundError:
        raise TraitscopeError(f"{fpath} is missing{fix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TraitscopeError(f"{fpath} cannot be read ({getattr(err, 'strerror', None) or err}){fix}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise TraitscopeError(f"{fpath} is damaged (not valid JSON: {err.msg} at line {err.lineno}){fix}") from None
    if not isinstance(obj, kind):
        raise TraitscopeError(f"{fpath} is damaged (a JSON {type(obj).__name__}, expected a {kind.__name__}){fix}")
    return obj


def load_safetensors(fpath: Path, like: dict | None = None, fix: str = "") -> dict:
    """The tensors of a safetensors file; each tensor `like` names (a state dict) must be there with its
    shape and dtype. A missing or damaged file (truncated, bad header, wrong or missing tensors) is a
    TraitscopeError that names it and says `fix`."""
    fix = f"; {fix}" if fix else ""
    if not Path(fpath).is_file():
        raise TraitscopeError(f"{fpath} is missing{fix}")
    try:
        tensors = load_file(str(fpath))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise TraitscopeError(f"{fpath} is damaged ({' '.join(str(err).split())}){fix}") from None
    for name, ref in (like or {}).items():
        if name not in tensors:
            raise TraitscopeError(f"{fpath} is damaged (no tensor {name!r}){fix}")
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            raise TraitscopeError(f"{fpath} is damaged ({name} is {got.dtype} {tuple(got.shape)}, expected "
                                  f"{ref.dtype} {tuple(ref.shape)}){fix}")
    return tensors
