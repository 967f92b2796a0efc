"""What every Hydra entry point shares (data_pipelines/prepare.py here, train/run.py above): a configuration mistake
ends in one `error:` line and exit code 1, Hydra's own composition errors included.

Hydra prints a composition error (an unknown key, a wrong type, a missing group option, an override it cannot parse)
as a 7-15-line block and exits itself (hydra/_internal/utils.py, `run_and_report`). `run_hydra` asks Hydra to raise
instead (its HYDRA_FULL_ERROR switch) and condenses the error into one sentence. GPT2_FORGE_DEBUG=1, or
HYDRA_FULL_ERROR=1 set by the user, keeps the tracebacks.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
from dataclasses import fields, is_dataclass
from typing import Any, Callable

DEBUG_ENV = "GPT2_FORGE_DEBUG"

# lines of Hydra's and OmegaConf's messages that say nothing a user acts on (or give advice that does not apply:
# `+key` would add a key the typed schema does not have)
_NOISE = ("full_key:", "reference_type=", "object_type=", "To append to your config", "Set the environment variable",
          "Config search path", "provider=", "See https://hydra.cc")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for the argparse entry points (export, generate, evaluate, launch/slurm.py): a usage mistake
    is one `error: <message>; see <prog> --help` line and exit code 2, where argparse prints its usage block first."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def debug() -> bool:
    """Whether the user asked for tracebacks: GPT2_FORGE_DEBUG=1 (when set, it decides), else HYDRA_FULL_ERROR=1."""
    if os.environ.get(DEBUG_ENV) is not None:
        return os.environ[DEBUG_ENV] == "1"
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def unknown_key_message(full_key: str, schema: Any) -> str:
    """One sentence for a key the typed config `schema` (a dataclass) does not have, with the closest real key."""
    group, _, name = full_key.rpartition(".")
    names = [f.name for f in fields(schema)] if is_dataclass(schema) else []
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {group + '.' if group else ''}{close[0]}?" if close else "check the spelling"
    owner = getattr(schema, "__name__", "the config")
    return f"{full_key} is not a setting ({owner} has no {name!r}); {hint}"


def hydra_error_line(err: BaseException) -> str:
    """Hydra's / OmegaConf's multi-line composition error as one sentence (first line; its cause's first line; a
    missing group option lists the options)."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    missing = (ConfigKeyError, ConfigAttributeError)
    key_error = err if isinstance(err, missing) else cause if isinstance(cause, missing) else None
    if key_error is not None and getattr(key_error, "full_key", None) and is_dataclass(key_error.object_type):
        return unknown_key_message(key_error.full_key, key_error.object_type)
    if isinstance(err, OverrideParseException):
        first = str(err).strip().splitlines()[0] if str(err).strip() else "cannot parse it"
        return (f"cannot parse the override {err.override!r} ({first}); quote a value that holds = , [ ] {{ }} ( ) or "
                f"spaces for Hydra: key='value' (and the whole argument for the shell)")
    parts: list[str] = []
    for e in (err, cause):
        if e is None:
            continue
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith(_NOISE)]
        if not lines:
            continue
        head, rest = lines[0], lines[1:]
        options = next((i for i, line in enumerate(rest) if line.startswith("Available options")), None)
        if options is not None:
            head += f"; {rest[options].rstrip(':').lower()}: {', '.join(rest[options + 1:])}"
        elif rest and e is err:
            head += f": {rest[0]}"
        parts.append(head.rstrip("."))
    return ": ".join(parts) or type(err).__name__


# what Hydra's override grammar takes unquoted in a value (hydra/grammar/OverrideLexer.g4: ID, path-like characters)
_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_\-+./:@~%]+")


def override(key: str, value: Any) -> str:
    """`key=value` as one command-line argument that a POSIX shell passes on unchanged and Hydra parses back to
    `value`: the value goes in Hydra's single quotes when it holds a character its grammar reserves (`=`, `,`, spaces,
    brackets: a run_dir like runs/lr=3e-3,bs=8 fails to parse unquoted, hydra#1577), then the argument is
    shell-quoted."""
    text = str(value)
    if not _HYDRA_PLAIN.fullmatch(text):
        text = "'" + text.replace("'", "\\'") + "'"  # Hydra: a backslash escapes only a quote
    arg = f"{key}={text}"
    if "'" in arg and not set(arg) & set('"$`\\!'):
        return f'"{arg}"'  # the readable shell quoting: nothing inside is special to the shell between double quotes
    return shlex.quote(arg)


def run_hydra(main: Callable[[], Any]) -> Any:
    """Call a `@hydra.main` function; Hydra's composition errors end in `error: <one sentence>` on stderr and exit 1.

    Raises SystemExit(1) on such an error (re-raises it under `debug()`); anything else passes through unchanged.
    The switches are environment variables, so the processes Lightning or torchrun start again behave the same.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_debug = debug()
    if not user_debug:
        os.environ[DEBUG_ENV] = "0"  # our own handlers stay terse although HYDRA_FULL_ERROR is now set
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them
    try:
        return main()
    except (HydraException, OmegaConfBaseException) as e:
        if user_debug:
            raise
        print(f"error: {hydra_error_line(e)}", file=sys.stderr)
        sys.exit(1)


__all__ = ["ArgumentParser", "DEBUG_ENV", "debug", "hydra_error_line", "override", "run_hydra", "unknown_key_message"]
