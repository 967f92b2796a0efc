"""The sweep summary: a Hydra callback that writes `summary.csv` and `summary.md` into the sweep directory after a
multirun, one row per job: its number, its overrides (one column per swept key), its status and final metrics.

    python train/run.py -m task=cls optim.lr=1e-5,3e-5,1e-4 seed=1,2
    -> multirun/<date>/<time>/{0..5}/ (one run dir per job) + summary.csv + summary.md

Configured under `hydra.callbacks` in conf/config.yaml. `on_job_end` runs in the job's own process (also on a SLURM
node under hydra/launcher=slurm) and writes `<job dir>/sweep_job.json` (overrides + status); `on_multirun_end` runs in
the launching process once every job has finished and reads each job's sweep_job.json and the summary.json that
train() wrote. Metrics: global_step, the task's final validation metrics (`final_metrics`), the best value of the
monitored metric (`best/<metric>`), LM runs' last train/val loss.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

JOB_FILE = "sweep_job.json"
SUMMARY_FILE = "summary.json"  # written by train() (train/job.py) in each run dir
LM_KEYS = ("last_train_loss", "last_val_loss")


def job_row(job_dir: Path) -> Optional[dict[str, Any]]:
    """One row of the table from a job folder (None when the job left nothing)."""
    job_file, summary_file = job_dir / JOB_FILE, job_dir / SUMMARY_FILE
    if not job_file.is_file() and not summary_file.is_file():
        return None
    job = json.loads(job_file.read_text()) if job_file.is_file() else {}
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    row: dict[str, Any] = {"job": job.get("num", job_dir.name)}
    for ov in job.get("overrides", []):
        key, _, value = ov.partition("=")
        row[key.lstrip("+~")] = value
    row["status"] = job.get("status", "COMPLETED" if summary else "UNKNOWN")
    row["global_step"] = summary.get("global_step")
    for k, v in (summary.get("final_metrics") or {}).items():
        row[k] = v
    best = summary.get("best")
    if best:
        row[f"best/{best['metric'].removeprefix('val/')}"] = best["value"]
        row["best_step"] = best["step"]
    for k in LM_KEYS:
        if summary.get(k) is not None:
            row[k] = summary[k]
    row["run_dir"] = str(job_dir)
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    """summary.csv + summary.md of every job folder under sweep_dir; -> (csv, md, rows)."""
    sweep_dir = Path(sweep_dir)
    dirs = sorted((d for d in sweep_dir.iterdir() if d.is_dir()),
                  key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))
    rows = [r for r in (job_row(d) for d in dirs) if r is not None]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    columns = [c for c in columns if c != "run_dir"] + (["run_dir"] if rows else [])
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in columns})
    lines = [f"# Sweep summary: {sweep_dir}", "", f"{len(rows)} jobs.", ""]
    if rows:
        lines += ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path, rows


class SweepSummary(Callback):
    """Hydra callback: per-job sweep_job.json (on_job_end), then summary.csv/.md in the sweep dir (on_multirun_end)."""

    def __init__(self) -> None:
        self.sweep_dir: Optional[Path] = None

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))  # resolved once: ${now:...} would move later

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            hc = HydraConfig.get()
        except ValueError:
            return
        if hc.mode is None or str(hc.mode) != "RunMode.MULTIRUN":
            return  # a single run has no sweep table
        out = Path(hc.runtime.output_dir)
        status = getattr(job_return.status, "name", str(job_return.status))
        job = {"num": hc.job.num, "overrides": list(job_return.overrides or []), "status": status}
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        csv_path, md_path, rows = write_summary(sweep_dir)
        log.info("sweep summary of %d jobs: %s, %s", len(rows), csv_path, md_path)
        print(f"sweep summary ({len(rows)} jobs): {md_path}")


__all__ = ["SweepSummary", "job_row", "write_summary"]
