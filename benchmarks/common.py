"""Shared helpers for the side-by-side benchmarks: the machine line, interleaved timing, medians.

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


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy (what a benchmark printed, for RESULTS.md)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recorded(benchmark: str, results: Path = RESULTS) -> Iterator[None]:
    """Run a benchmark's main inside this: what it prints is also appended to benchmarks/RESULTS.md, under the
    benchmark's own `## <benchmark>` heading (created if missing), as a dated entry with the command line (the
    machine line is the first thing every benchmark prints). `--no-record` on the command line skips it (the flag is
    removed before the benchmark parses its arguments); a benchmark that raises records nothing.

    History stays in the file: entries are appended, never replaced, so a figure quoted in README can be traced to
    the run that produced it.
    """
    record = "--no-record" not in sys.argv
    sys.argv = [a for a in sys.argv if a != "--no-record"]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    if not record or not tee.copy.getvalue().strip():
        return
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    entry = f"### {stamp}\n`{command}`\n\n```\n{tee.copy.getvalue().rstrip()}\n```\n"
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
