"""Writing files so that a crash or a concurrent reader never sees half of one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_text", "create_text", "unique_dir"]


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{kind}")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a sibling temporary file, then rename it over ``path``.

    The temporary file is created as ``open`` would create ``path`` (mode 0666 less the umask), not private
    as ``mkstemp`` makes it: results are for whoever the user's umask lets read them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def create_text(path: Path, text: str) -> bool:
    """Write ``path`` whole unless it exists (then leave it); True if this call wrote it. Atomic and exclusive:
    of processes racing to create it, one wins and the others see the complete file."""
    path = Path(path)
    if path.exists():
        return False
    tmp = _sibling(path, "tmp")
    atomic_write(tmp, lambda name: Path(name).write_text(text))
    try:
        os.link(tmp, path)  # fails if path exists: unlike rename, never replaces
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: rename, which is atomic but not exclusive
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def unique_dir(parent: Path, prefix: str) -> Path:
    """A new directory in ``parent`` with a unique name, created with mode 0777 less the umask."""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
