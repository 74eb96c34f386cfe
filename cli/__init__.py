"""The `deco-gguf` command line (`main.py`: the app and its commands)."""

import sys


def run() -> None:
    """Entry point: Ctrl-C at any moment, even while the modules load, prints "interrupted" and
    exits 130; SIGTERM prints "terminated" and exits 143; outputs being written are removed."""
    from ..support.signals import Terminated, raise_on_sigterm

    try:
        raise_on_sigterm()
        from .main import app

        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
