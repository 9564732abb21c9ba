"""How every file of the formats reaches the disk: whole or not at all."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temp_name(path: Path) -> Path:
    """``.<name>.<random>.tmp`` beside ``path`` (``schemas.manifest.SHARD_TMP`` recognises it for shards)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, content: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary file) to a temp file
    beside ``path``, fsync it and rename it over ``path``: readers see the old file or the new one. An
    ``OSError`` (a full disk) names ``path``; the temp file never stays behind."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def sha256_stream(f: BinaryIO) -> str:
    """Hex sha256 of what is left to read in ``f``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    while block := f.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    with open(path, "rb") as f:
        return sha256_stream(f)
