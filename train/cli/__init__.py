"""The command-line entry points: `python train/run.py` (run.py, the Hydra shell of train/job.py), and
`python train/cli/export.py`, `python train/cli/generate.py`, `python train/cli/evaluate.py`.

Each ends a mistake of its user (a wrong path, option or file) with one `error:` line and exit code 1 instead of a
traceback; GPT2_FORGE_DEBUG=1 (or HYDRA_FULL_ERROR=1) re-raises for the traceback (data_pipelines.cli.debug).
"""

from __future__ import annotations

import sys
from typing import Callable

from data_pipelines.cli import debug

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


def error_line(err: BaseException) -> str:
    """The one sentence printed for `err`: the first line of its message (a KeyError names the missing key)."""
    text = str(err).strip()
    msg = text.splitlines()[0] if text else type(err).__name__
    return f"missing key {msg}" if isinstance(err, KeyError) else msg


def run_cli(body: Callable[[], int], errors: tuple[type[BaseException], ...] = EXPECTED_ERRORS) -> int:
    """body()'s exit code; an expected error -> `error: <sentence>` on stderr and 1 (re-raised under debug())."""
    try:
        return body()
    except errors as e:
        if debug():
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1


__all__ = ["EXPECTED_ERRORS", "debug", "error_line", "run_cli"]
