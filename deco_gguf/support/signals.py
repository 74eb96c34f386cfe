"""Interrupts that end a command cleanly: Ctrl-C (SIGINT) and SIGTERM.

Both unwind the stack, so every output being written is removed (`files.atomic_output`). Ctrl-C
raises KeyboardInterrupt as Python does; SIGTERM raises `Terminated`, which is not a
KeyboardInterrupt, so code that stops a reply on Ctrl-C and goes on does not survive a SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


class Terminated(BaseException):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001
    raise Terminated()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` (in the main thread) instead of killing the process."""
    signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def held_interrupts() -> Iterator[Callable[[], None]]:
    """Hold SIGINT and SIGTERM inside the block; yield `check`, which raises a held one.

    Raised from a signal handler in the middle of third-party reading code (safetensors, torch),
    KeyboardInterrupt can surface as an unrelated error (a ValueError about storage shapes); held,
    it is raised where the caller checks, between whole reads, or when the block ends."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None  # handlers can only be set in the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def check() -> None:
        if held:
            raise KeyboardInterrupt() if held[0] == signal.SIGINT else Terminated()

    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:  # a background job ignores Ctrl-C: keep it that way
            signal.signal(s, lambda signum, _frame: held.append(signum))
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    check()
