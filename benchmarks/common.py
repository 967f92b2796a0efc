"""Shared helpers for the side-by-side benchmarks: the machine line, interleaved timing, medians, and recording a
run in benchmarks/RESULTS.md (`record_results`, `recorded`).

Every benchmark runs the baseline and ours in one process on the same inputs. Repeats are interleaved and the order
flips each round (A B, B A, A B, ...) so that load from other processes on a shared machine, thermal drift or a
warming page cache hits both sides alike; the median of the repeats is what gets reported.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line that says where a number came from: CPU (or GPU), cores, torch version and intra-op threads."""
    parts = [f"cpu: {cpu_model()} ({os.cpu_count()} logical cores)", f"torch {torch.__version__}",
             f"threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        parts.insert(1, f"gpu: {torch.cuda.get_device_name()}")
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    return " | ".join(parts)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` times each, interleaved with alternating order.

    `warmup` untimed rounds come first (allocator, lazy init, page cache, one-time kernels).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name])[0])
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """min..max of the repeats, to show the noise next to a median."""
    return f"[{min(xs):.3g}..{max(xs):.3g}]"


def corpus_text(n_chars: int) -> str:
    """The first `n_chars` characters of the embedded default corpus (`data_pipelines.corpus.build_corpus()`: CPython's
    documentation prose, documents joined by blank lines) — English text every machine can make, so no benchmark
    reads a file outside the repository. Raises ValueError when the corpus is shorter than `n_chars`."""
    from data_pipelines.corpus import build_corpus

    text = "\n\n".join(build_corpus())
    if len(text) < n_chars:
        raise ValueError(f"the embedded corpus has {len(text)} characters, fewer than the {n_chars} asked")
    return text[:n_chars]


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NO_RECORD_HELP = "do not append this run to benchmarks/RESULTS.md"


def record_machine_line() -> str:
    """Where a recorded figure came from: the GPU name (when there is one), else the CPU model and core count; and
    the torch version. The figures mean nothing without it."""
    where = (f"gpu: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
             else f"cpu: {cpu_model()} ({os.cpu_count()} logical cores)")
    return f"{where} | torch {torch.__version__}"


def command_line(argv: list[str]) -> str:
    """argv as a shell command from the repository root; paths under the working directory become relative and the
    home directory becomes `~`, so no machine's layout ends up in RESULTS.md."""
    home = os.path.expanduser("~")

    def portable(arg: str) -> str:
        if os.path.isabs(arg) and Path(arg).resolve().is_relative_to(Path.cwd()):
            return os.path.relpath(arg)
        return "~" + arg[len(home):] if home not in ("", "/") and arg.startswith(home + os.sep) else arg

    return "python " + " ".join(shlex.quote(portable(a)) for a in [os.path.relpath(argv[0]), *argv[1:]])


def record_results(benchmark: str, lines: list[str], argv: list[str], results: Path = RESULTS) -> None:
    """Append a dated entry to `results` under the benchmark's own `## <benchmark>` heading (created at the end of
    the file if missing): a `### <date>` line, the machine line, the command line and `lines` (what the run
    printed). Entries are appended, never replaced, so the newest entry of a heading is the current figure and a
    figure quoted elsewhere can be traced to the run that produced it."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = "\n".join(line.rstrip() for line in lines).strip("\n")
    entry = (f"### {stamp}\n- machine: {record_machine_line()}\n- command: `{command_line(argv)}`\n\n"
             f"```\n{body}\n```\n")
    text = results.read_text(encoding="utf-8") if results.is_file() else "# Benchmark results\n"
    heading = f"## {benchmark}\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}"
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    text = text[:end].rstrip("\n") + "\n\n" + entry + ("\n" + text[end:] if end < len(text) else "")
    results.write_text(text, encoding="utf-8")
    print(f"recorded in {os.path.relpath(results)}", file=sys.stderr)


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy (what a benchmark printed, for RESULTS.md)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


class Recording:
    """What `recorded` yields: set `skip = True` when a run measured nothing worth keeping (a smoke run, no
    device)."""

    def __init__(self, skip: bool):
        self.skip = skip


@contextlib.contextmanager
def recorded(benchmark: str, results: Path = RESULTS) -> Iterator[Recording]:
    """Run a benchmark's main inside this: what it prints on stdout is also kept, and when main returns it goes to
    `record_results` (every benchmark's parser has `--no-record`, which skips that). A benchmark that raises or
    exits (`--help`, a bad argument) records nothing."""
    argv = list(sys.argv)
    rec = Recording(skip="--no-record" in argv)
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield rec
    if not rec.skip and tee.copy.getvalue().strip():
        record_results(benchmark, tee.copy.getvalue().splitlines(), argv, results)
