"""The console a command reports to may go away while the work goes on: ``attndistill batch ... 2>&1 | head``,
a ``tee`` ended by Ctrl-C, a closed SSH session's pipe. Its first failed write (``BrokenPipeError``) failed the
job that wrote a progress bar line, marked it failed for good in the batch's records, and stopped the batch.
Now the reports go nowhere from then on, and the results are still written."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class ReaderMayLeave(io.TextIOBase):
    """A text stream whose writes are dropped once its reader has gone. The file descriptor is then pointed at
    the null device (as Python's documentation advises for SIGPIPE), so that what other code holds of it (the
    stream's buffer, flushed at exit) no longer fails either."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream, self.gone = stream, False

    def _guarded(self, action, default):
        if self.gone:
            return default
        try:
            return action()
        except OSError as exc:  # EPIPE: a pipe's reader gone; EIO: the terminal hung up
            if exc.errno not in (errno.EPIPE, errno.EIO):
                raise
            self.gone = True
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self.stream.fileno())
                os.close(null)
            return default

    def write(self, text: str) -> int:
        return self._guarded(lambda: self.stream.write(text), len(text))

    def flush(self) -> None:
        self._guarded(self.stream.flush, None)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return not self.gone and self.stream.isatty()

    @property
    def encoding(self):
        return self.stream.encoding

    @property
    def errors(self):
        return self.stream.errors

    def __getattr__(self, name: str):  # buffer, mode, name ... as the stream has them
        return getattr(self.stream, name)


@contextmanager
def readers_may_leave() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` as :class:`ReaderMayLeave` for the block (what progress bars and log
    handlers made in it write to)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, ReaderMayLeave) else ReaderMayLeave(s) for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
