"""Atomic file writes: a temporary file beside the target, renamed into place on success.

A reader (or a later run) then sees the old file or the new one, never a truncated one, even
when the writer is killed mid-write (a preempted job, Ctrl-C); ``signals_deferred`` keeps a
pre-emption handler from ending the process in the middle of a binary write. Standard library
only, so that torch-free modules (the config loader) can use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[TextIO]:
    """Open a temporary file next to ``path`` and move it into place only on success.

    A crash while writing (e.g. streaming a multi-GB annotation list) never leaves a partial
    file at ``path``; the temporary file is removed on any exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; outputs are data meant to be shared.
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a small text file (JSON, YAML, CSV, Markdown) atomically."""
    with atomic_writer(path) as fh:
        fh.write(text)


# Signals whose Python handlers may end the process while a file is being written: SLURM's
# pre-emption / time-limit warning (submitit requeues and exits from its USR2 handler), TERM and
# Ctrl-C.
_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGTERM",
                                                             "SIGINT") if hasattr(signal, name))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Python-level signal handlers until the block ends, then run them.

    submitit's pre-emption handler requeues the job and calls ``sys.exit`` from whatever frame the
    main thread is in. Raised inside ``torch.save``, that exit unwinds the zip writer mid-record,
    whose cleanup then fails with its own error: the job ends "failed" instead of requeued, even
    though the previous checkpoint is intact. Deferring the handler to the end of the write makes
    the requeue see the new checkpoint. Blocking the signal with ``pthread_sigmask`` would not do:
    the kernel may deliver it to another thread (the intra-op pool), and Python still runs the
    handler in the main thread. Outside the main thread handlers cannot be swapped (nor run).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, object] = {}
    for signum in _DEFERRED_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):  # SIG_DFL / SIG_IGN / a C handler are left alone
            saved[signum] = handler
            signal.signal(signum, lambda num, _frame: pending.append(num))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)  # the original handler runs now, the file complete
