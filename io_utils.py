"""Small shared helpers: the project's one atomic write (the data tools, and checkpoints.py
for every checkpoint) and the tools' one-line error type.

Example (from Python): ``with atomic_open("out.txt") as fp: fp.write("x")``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator, List, Optional


class ToolError(Exception):
    """A user-facing error: ``main()`` prints ``error: <message>`` (one line) and exits 2."""


@contextlib.contextmanager
def _temp_beside(path: str, mode: str, encoding: Optional[str], replace: bool = False) -> Iterator:
    """Yield (file, temp path) of a new hidden temp file in the folder of ``path``; at the end of
    the block flush and fsync it (and with ``replace`` rename it onto ``path``); remove it on any
    exception."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding,
                       **({} if binary else {"newline": "\n"})) as fp:
            os.fchmod(fp.fileno(), 0o644)                  # mkstemp creates 0600
            yield fp, tmp
            fp.flush()
            os.fsync(fp.fileno())
        if replace:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: Optional[str] = "utf-8") -> Iterator:
    """Open a temp file in the same folder as ``path``; on success flush, fsync and
    ``os.replace`` it onto ``path``; on any exception remove it (``path`` untouched)."""
    with _temp_beside(os.fspath(path), mode, encoding, replace=True) as (fp, _):
        yield fp


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as fp:
        fp.write(text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as fp:
        fp.write(data)


class AtomicGroup:
    """Stage several outputs as temp files, then move them all into place with
    ``commit()``; ``abort()`` (or an exception inside ``with``) removes them all, so
    a failing run leaves none of the final files written."""

    def __init__(self) -> None:
        self._staged: List[tuple] = []

    def stage(self, path: str, writer: Callable, mode: str = "w") -> None:
        path = os.fspath(path)
        with _temp_beside(path, mode, "utf-8") as (fp, tmp):
            self._staged.append((tmp, path))
            writer(fp)

    def stage_copy(self, src: str, path: str, link: bool = False) -> None:
        """Stage a copy of ``src`` (a hard link when ``link`` and the file system allows)."""
        import shutil

        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if link:
            tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.link.tmp")
            with contextlib.suppress(OSError):
                os.remove(tmp)
            try:
                os.link(src, tmp)
                self._staged.append((tmp, path))
                return
            except OSError:
                pass
        with open(src, "rb") as fin:
            self.stage(path, lambda fp: shutil.copyfileobj(fin, fp, 1 << 20), mode="wb")

    def commit(self) -> None:
        for tmp, path in self._staged:
            os.replace(tmp, path)
        self._staged = []

    def abort(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        self._staged = []

    def __enter__(self) -> "AtomicGroup":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def run_main(fn: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Call ``fn(argv)``; turn a ToolError into ``error: ...`` on stderr and exit code 2. A reader
    that closes the pipe early (``compare.py ... | head``) ends the tool quietly."""
    try:
        return fn(argv) or 0
    except BrokenPipeError:
        # Python's recipe: point stdout at devnull so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
