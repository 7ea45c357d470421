"""What every entry point does with a user's mistake: one clear message, no traceback, exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from trainables.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit with its code; a :class:`UserError` prints ``error: <message>`` to stderr."""
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: what was recorded so far is kept; rerun with --resume where the command supports it", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)


def parse_assignments(pairs: list[str], flag: str) -> dict[str, str]:
    """``["a=0.1", "eps=4/255"]`` -> ``{"a": "0.1", "eps": "4/255"}`` (values stay strings; the config validates them)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {pair!r} is not KEY=VALUE: write e.g. {flag} lr=1e-4")
        values[key.strip()] = value.strip()
    return values


def check_writable(folder: Path, option: str) -> None:
    """Create ``folder`` if needed and write a probe file into it, now rather than after minutes of compute;
    a UserError names the folder and the option to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {folder} ({error.strerror or error}): choose a writable {option}") from None
