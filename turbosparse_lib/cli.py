"""What the five console scripts share: one ``--preset`` argument that offers its choices, and one way to refuse a
bad argument (a line naming the program, exit code 2, as argparse itself exits on a malformed command line).
A run that was asked for correctly but failed exits 1."""

from __future__ import annotations

import argparse
import sys

from .presets import PRESET_NAMES

USAGE_ERROR = 2  # a bad argument or input: nothing was run
RUN_FAILED = 1  # the arguments were good, the run failed (a notebook cell raised)
PRESET_HELP = "smoke (CI, seconds), cpu (the default reproduction, 2 cores), gpu (one GPU), paper (the paper's sizes)"


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)


def add_preset(p: argparse.ArgumentParser, default: str = "cpu", note: str = "") -> None:
    """``--preset`` with its choices listed in ``--help`` and checked by argparse (a typo exits 2, naming them)."""
    p.add_argument(
        "--preset",
        default=default,
        choices=PRESET_NAMES,
        help=f"{PRESET_HELP} (default {default}){'; ' + note if note else ''}",
    )


def refuse(prog: str, error: object) -> int:
    """Print why the command cannot run, as one line naming the program; returns the exit code."""
    print(f"{prog}: {error}", file=sys.stderr)
    return USAGE_ERROR
