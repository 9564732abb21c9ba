"""Where files live: a local path or an ``s3://bucket/key`` URL, and the few operations readers and writers need.

S3 goes through ``pyarrow.fs``, built by ``FileSystem.from_uri`` so that ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) points it at another S3-compatible store; credentials come from the environment,
``~/.aws`` or the instance role. An object is written in one request (``put``): readers see the old object or
the new one, as ``atomic_write`` gives locally.
"""

from __future__ import annotations

import io
import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from pyarrow import fs as pafs

from schemas.files import atomic_write, sha256_stream

SCHEMES = ("s3",)
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
CHUNK = 4 << 20  # bytes per read-ahead request
DEPTH = 4  # chunks a reader fetches ahead


@dataclass(frozen=True)
class Location:
    """A local path (``url`` holds ``str(Path)``) or an ``s3://bucket/key`` URL (no trailing slash).

    ``str()`` gives that string, so messages and config hashes read as they did with a ``Path``. There is no
    ``__fspath__``: code that would ``open()`` a URL fails loudly instead of creating a folder named ``s3:``."""

    url: str

    @classmethod
    def parse(cls, value: Location | Path | str) -> Location:
        """A Location from a path or URL; ``ValueError`` naming it if the scheme or key is not usable."""
        if isinstance(value, Location):
            return value
        if isinstance(value, Path):
            return cls(str(value))
        if not isinstance(value, str):
            raise ValueError(f"expected a path or an s3:// URL, got {type(value).__name__} {value!r}")
        match = _URL.match(value)
        if match is None:
            return cls(str(Path(value)))
        scheme, rest = match["scheme"].lower(), match["rest"].rstrip("/")
        if scheme not in SCHEMES:
            raise ValueError(f"{value}: unsupported scheme {scheme!r} (a local path or s3://bucket/prefix)")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{value}: no bucket (s3://bucket/prefix)")
        if key:
            _check_relative(value, key)
        return cls(f"{scheme}://{rest}")

    @property
    def is_local(self) -> bool:
        return _URL.match(self.url) is None

    @property
    def local(self) -> Path:
        """The local path; ``ValueError`` for a URL."""
        if not self.is_local:
            raise ValueError(f"{self.url}: not a local path")
        return Path(self.url)

    @property
    def fs(self) -> pafs.FileSystem:
        """The filesystem holding this location (one per bucket and endpoint per process)."""
        if self.is_local:
            return pafs.LocalFileSystem()
        root = self.url.split("/", 3)[:3]  # s3:, "", bucket
        endpoints = tuple(os.environ.get(v) for v in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"))
        return _filesystem("/".join(root), endpoints)

    @property
    def fs_path(self) -> str:
        """The path within ``fs``: the local path, or ``bucket/key``."""
        return self.url if self.is_local else self.url.split("://", 1)[1]

    def __truediv__(self, part: str) -> Location:
        """The location of ``part`` (relative, ``/``-separated, no ``..``) below this one."""
        _check_relative(part, part)
        return Location(str(self.local / part) if self.is_local else f"{self.url}/{part}")

    @property
    def name(self) -> str:
        """The last component (``""`` for a bucket, as ``Path("/").name``)."""
        if self.is_local:
            return self.local.name
        return self.fs_path.partition("/")[2].rpartition("/")[2]

    @property
    def parent(self) -> Location:
        """The enclosing folder or prefix (a bucket is its own parent, as ``Path("/")``)."""
        if self.is_local:
            return Location(str(self.local.parent))
        return Location(self.url.rpartition("/")[0]) if self.name else self

    def resolve(self) -> Location:
        """An absolute location: a local path resolved (``Path.resolve``), a URL as is."""
        return Location(str(self.local.resolve())) if self.is_local else self

    def __str__(self) -> str:
        return self.url


def _check_relative(where: str, relative: str) -> None:
    """Refuse an empty or absolute ``relative`` (a key, or a part joined on) and empty, ``.`` or ``..`` parts."""
    if any(p in ("", ".", "..") for p in relative.split("/")):
        raise ValueError(f"{where!r}: expected a relative path without empty, '.' or '..' parts")


@lru_cache(maxsize=None)
def _filesystem(root: str, env: tuple[str | None, ...]) -> pafs.FileSystem:
    """``FileSystem.from_uri`` honours ``AWS_ENDPOINT_URL``; the ``S3FileSystem`` constructor does not."""
    try:
        return pafs.FileSystem.from_uri(root)[0]
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError alike
        raise OSError(f"{root}: cannot open the object store: {exc}") from exc


def _named(exc: OSError, loc: Location) -> OSError:
    """``exc`` naming ``loc`` (pyarrow names ``bucket/key`` at most)."""
    if exc.filename is None and exc.errno is not None:
        return type(exc)(exc.errno, exc.strerror or str(exc), str(loc))
    return OSError(f"{loc}: {exc}")


def put(loc: Location, content: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary file) whole or not at all:
    ``atomic_write`` locally; on S3 the bytes are built in memory first and sent in one request, so a
    function that raises leaves no object (an exception inside an open pyarrow output stream would still
    commit what was written). An ``OSError`` names ``loc``."""
    if loc.is_local:
        atomic_write(loc.local, content)
        return
    if callable(content):
        buffer = io.BytesIO()
        content(buffer)
        data = buffer.getvalue()
    else:
        data = content.encode() if isinstance(content, str) else content
    try:
        with loc.fs.open_output_stream(loc.fs_path) as stream:
            stream.write(data)
    except OSError as exc:
        raise _named(exc, loc) from exc


def read_bytes(loc: Location) -> bytes:
    """The whole file (one GET on S3); ``FileNotFoundError`` naming ``loc`` when it is missing."""
    if loc.is_local:
        return loc.local.read_bytes()
    try:
        with loc.fs.open_input_stream(loc.fs_path) as stream:
            return stream.read()
    except OSError as exc:
        raise _named(exc, loc) from exc


def read_text(loc: Location) -> str:
    """The whole file as UTF-8 text."""
    return read_bytes(loc).decode()


def read_text_if_present(loc: Location) -> str | None:
    """The whole file as UTF-8 text (one GET on S3), or None when there is no file there."""
    try:
        return read_text(loc)
    except (FileNotFoundError, IsADirectoryError):
        return None


def append(loc: Location, text: str) -> None:
    """Add ``text`` at the end of a text file, creating it: an append locally; on S3 the object is read and
    written whole again (one writer at a time, as a run's log)."""
    if loc.is_local:
        with loc.local.open("a") as f:
            f.write(text)
        return
    put(loc, (read_text_if_present(loc) or "") + text)


def _info(loc: Location) -> pafs.FileInfo:
    """What the object store says of ``loc`` (one HEAD); an ``OSError`` names ``loc``."""
    try:
        return loc.fs.get_file_info(loc.fs_path)
    except OSError as exc:
        raise _named(exc, loc) from exc


def size(loc: Location) -> int | None:
    """The size of a file in bytes (one HEAD on S3); None when there is no file there."""
    if loc.is_local:
        return loc.local.stat().st_size if loc.local.is_file() else None
    info = _info(loc)
    return info.size if info.type == pafs.FileType.File else None


def modified(loc: Location) -> float:
    """When a file was last written, in seconds since the epoch; ``FileNotFoundError`` naming ``loc``."""
    if loc.is_local:
        return loc.local.stat().st_mtime
    info = _info(loc)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "No such file", str(loc))
    return info.mtime.timestamp()


def is_dir(loc: Location) -> bool:
    """A local folder, or a prefix with at least one object below it."""
    return loc.local.is_dir() if loc.is_local else _info(loc).type == pafs.FileType.Directory


def list_files(prefix: Location) -> dict[str, int]:
    """Every file below ``prefix``, recursively: ``/``-separated relative name → size (empty if none)."""
    if prefix.is_local:
        root = prefix.local
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    selector = pafs.FileSelector(prefix.fs_path, recursive=True, allow_not_found=True)
    try:
        infos = prefix.fs.get_file_info(selector)
    except OSError as exc:
        raise _named(exc, prefix) from exc
    start = len(prefix.fs_path) + 1
    return {i.path[start:]: i.size for i in infos if i.type == pafs.FileType.File}


def makedirs(loc: Location) -> None:
    """Create a local folder and its parents (as ``mkdir -p``); nothing on S3, where a key needs no folder."""
    if loc.is_local:
        loc.local.mkdir(parents=True, exist_ok=True)


def delete(loc: Location) -> None:
    """Delete one file; ``FileNotFoundError`` naming ``loc`` when there is none."""
    if loc.is_local:
        loc.local.unlink()
        return
    try:
        loc.fs.delete_file(loc.fs_path)
    except OSError as exc:
        raise _named(exc, loc) from exc


def sha256(loc: Location) -> str:
    """Hex sha256 of a file, streamed."""
    with open_read(loc) as f:
        return sha256_stream(f)


def open_read(loc: Location, chunk: int = CHUNK, depth: int = DEPTH) -> BinaryIO:
    """A forward-only binary reader: a buffered ``open`` locally; on S3 a ``ReadAhead`` whose thread fetches
    up to ``depth`` chunks of ``chunk`` bytes ahead. Opening a missing file raises ``FileNotFoundError``."""
    if loc.is_local:
        return open(loc.local, "rb")
    try:
        stream = loc.fs.open_input_stream(loc.fs_path)
    except OSError as exc:
        raise _named(exc, loc) from exc
    return io.BufferedReader(ReadAhead(stream, str(loc), chunk, depth), buffer_size=min(chunk, 1 << 20))


class ReadAhead(io.RawIOBase):
    """Reads ``stream`` on a thread, ``chunk`` bytes at a time, at most ``depth`` chunks ahead of the consumer, so
    requests overlap the consumer's work (memory: about ``(depth + 2) * chunk``). A read error reaches the
    consumer where it happened, and again on every later read; ``close`` stops the thread."""

    def __init__(self, stream: BinaryIO, name: str, chunk: int, depth: int) -> None:
        super().__init__()
        self.name = name
        self._stream, self._chunk = stream, chunk
        self._queue: queue.Queue[bytes | Exception] = queue.Queue(depth)
        self._stop = threading.Event()
        self._block, self._at = memoryview(b""), 0
        self._end: bool | Exception = False  # True at the end of the stream, or the error that ended it
        self._thread = threading.Thread(target=self._fetch, name=f"read-ahead {name}", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            while not self._stop.is_set():
                block = self._stream.read(self._chunk)
                self._offer(block)
                if not block:
                    return
        except Exception as exc:  # handed to the consumer, which raises it
            self._offer(exc)
        finally:
            self._stream.close()

    def _offer(self, item: bytes | Exception) -> None:
        while not self._stop.is_set():  # a closed reader takes nothing more
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer, as io.RawIOBase's
        if self.closed:
            raise ValueError("I/O operation on a closed file")
        while self._at == len(self._block):
            if isinstance(self._end, Exception):
                raise self._end
            if self._end:
                return 0
            item = self._queue.get()
            if isinstance(item, Exception):
                self._end = item
            elif not item:
                self._end = True
            else:
                self._block, self._at = memoryview(item), 0
        n = min(len(buffer), len(self._block) - self._at)
        buffer[:n] = self._block[self._at : self._at + n]
        self._at += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join()
        super().close()
