"""Safe files: atomic folder writes, and readers that never unpickle and name the file they reject.

Every folder star_hf writes goes through :func:`atomic_directory`: the files are written into a
hidden temporary sibling, flushed to disk (fsync), and the finished folder is then renamed into
place — on Linux by one atomic exchange (``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames.
An interrupted save (exception, Ctrl-C, full disk) therefore never leaves a half-written folder
where a good one was: the previous folder stays as it was and the temporary one is removed.

Readers only use JSON and safetensors; a missing or corrupt file raises an error naming it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from star_hf.errors import CorruptFileError

__all__ = ["atomic_directory", "read_json", "read_safetensors", "write_json"]


# ---------------------------------------------------------------------------------------- writing
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (directories last, so their entries are final)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(dirpath))


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool] | None = None) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``old`` that the save did not write (and ``keep`` accepts)."""
    for entry in os.scandir(old):
        if keep is not None and not keep(entry.name):
            continue
        src, dst = Path(entry.path), new / entry.name
        if entry.is_dir(follow_symlinks=False):
            if not dst.exists():
                dst.mkdir()
            if dst.is_dir() and not dst.is_symlink():
                _carry_over(src, dst)
        elif not os.path.lexists(dst):
            if entry.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"could not move the new folder into place: {os.strerror(err)}", str(b))


def _install(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` at ``target``, replacing what was there."""
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        # tmp now holds the previous folder; the save is complete even if its removal fails.
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(target.parent)


@contextmanager
def atomic_directory(path: str | os.PathLike, *, keep_existing: bool | Callable[[str], bool] = False) -> Iterator[Path]:
    """Write a folder atomically: yields an empty temporary folder, then renames it to ``path``.

    Args:
        path: the folder to create or replace. Its parent is created if needed.
        keep_existing: ``False`` — the folder becomes exactly what was written into the temporary
            folder. ``True`` — entries of the previous folder that the save did not write (a
            tokenizer, a README, other checkpoints) are carried over by hard link; files the save
            wrote replace theirs. A callable receives the name of each top-level entry of the
            previous folder and says whether to carry it over.

    If the ``with`` body raises (or the process is interrupted before the rename), the previous
    folder is untouched and the temporary folder is deleted. Only a hard kill can leave a hidden
    ``.<name>.tmp-*`` folder next to ``path`` — never in its place.
    """
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder; choose another save directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp, which creates mode 0700) so the saved folder gets the usual
    # permissions of the user's umask.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        yield tmp
        if keep_existing is not False and target.is_dir():
            _carry_over(target, tmp, None if keep_existing is True else keep_existing)
        _fsync_tree(tmp)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (inside an :func:`atomic_directory`)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- reading
def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {path} {where}.")


def read_json(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """Parse a JSON object from ``path``; errors name the file (``what`` says what it should be)."""
    path = Path(path)
    _require_file(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(
            f"{what} {path} is not valid JSON ({err}); the file is corrupt or was cut short."
        ) from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{what} {path} must hold a JSON object, found {type(data).__name__}.")
    return data


def read_safetensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (on the CPU) and header metadata of a safetensors file. Never unpickles."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _require_file(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(
            f"{what} {path} is not a readable safetensors file ({err}); the file is corrupt or was cut short."
        ) from None
    return tensors, metadata
