"""What every entry point shares: one clear message for a mistake (exit code 2), argument types, write probes.

The argument types raise ``argparse.ArgumentTypeError``, so argparse prints
``error: argument --eps: ...`` with the usage line and exits 2 before any work.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from trainables.attacks import ATTACKS
from trainables.device import check_device_name
from trainables.errors import UserError
from trainables.names import RESULTS_FILE

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


def output_file(text: str, option: str = "--output") -> Path:
    """An output file's absolute path, its folder created and probed for writing now (not after minutes of work)."""
    output = Path(text).expanduser().resolve()
    if output.is_dir():
        raise UserError(f"{option} {output} is a folder: give a file name, e.g. {output / RESULTS_FILE}")
    check_writable(output.parent, f"folder for {option}")
    return output


# ---- argparse types ---------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An integer >= 1 (``--max-images``, ``--batch-size``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def eps_list(text: str) -> tuple[float, ...]:
    """Comma-separated budgets in [0, 1] pixel units: ``2/255,4/255`` -> (0.00784..., 0.01568...)."""
    # Imported here: trainables.config imports the model code, which CLIs without eps (platform.data) need not load.
    from trainables.config import parse_eps

    try:
        values = tuple(parse_eps(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not values:
        raise argparse.ArgumentTypeError("no eps given: write e.g. --eps 2/255,4/255")
    return values


def attack_names(text: str) -> tuple[str, ...]:
    """Comma-separated attack names, each a key of ``trainables.attacks.ATTACKS``."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"no attack named: use one or more of {', '.join(ATTACKS)}, comma-separated")
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown attack {', '.join(map(repr, unknown))}: use one or more of {', '.join(ATTACKS)}")
    return names


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has it is checked by ``resolve_device``)."""
    try:
        return check_device_name(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
