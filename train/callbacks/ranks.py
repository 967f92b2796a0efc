"""A rank that died: when a collective fails because another process of the run is gone (SIGKILL, the OOM killer, a
crash), the run ends naming that rank and how it ended, instead of gloo's / NCCL's "Connection closed by peer".

Who can know: under Lightning's own launcher (`python train/run.py trainer.devices=N`), the process of local rank 0
started the other local ranks with `subprocess.Popen` (lightning/pytorch/strategies/launchers/subprocess_script.py),
so it reads their exit status; a started rank sees its launching rank 0 disappear as a change of its parent process.
Under torchrun or srun the launcher itself reports the failed rank (torchrun's "Root Cause" table), and this
callback stays silent.

Why the launcher's process list is emptied: Lightning's `_ChildProcessObserver` polls that list every 5 s and, on a
non-zero exit, SIGKILLs every process of the node including rank 0 (fabric/strategies/launchers/subprocess_script.py),
which would end the reporting process before it has said what happened. Once the dead rank is known, this callback
stops the other started ranks itself (`launcher.kill`) and empties the list the observer watches.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import Callback


def exit_status(returncode: int) -> str:
    """A Popen return code in words: -9 -> "was killed by SIGKILL", 3 -> "exited with code 3"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class LostRank(Callback):
    """After an exception in fit on a multi-process run: `lost` names the rank that ended first (None when no rank of
    this node's Lightning-launched group is known to have ended: the exception is then the run's own).

    wait_s: how long a surviving rank waits for the dead one's exit to become visible (the broken connection can be
    noticed before the process is reaped).
    """

    def __init__(self, wait_s: float = 2.0):
        self.wait_s = wait_s
        self.lost: Optional[str] = None
        self._parent: Optional[int] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._parent = os.getppid()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            return
        strategy = trainer.strategy
        if trainer.world_size == 1 or not isinstance(getattr(strategy, "cluster_environment", None),
                                                     LightningEnvironment):
            return  # one process, or torchrun / srun started the ranks: their launcher reports a dead one
        self.lost = self._find(trainer, getattr(strategy.launcher, "procs", None) or [])
        if self.lost is not None:
            launcher = strategy.launcher
            if getattr(launcher, "procs", None):
                launcher.kill(signal.SIGKILL)  # the other started ranks: what Lightning's observer would do
                launcher.procs.clear()  # ... without also killing this process before it has reported

    def _find(self, trainer, procs: list) -> Optional[str]:
        first_rank = trainer.node_rank * trainer.num_devices  # global rank of this node's local rank 0
        deadline = time.monotonic() + self.wait_s
        while True:
            for local, proc in enumerate(procs, start=1):  # procs[i] is local rank i + 1
                if proc.poll() not in (None, 0):
                    return f"rank {first_rank + local} (pid {proc.pid}) {exit_status(proc.returncode)}"
            if trainer.local_rank > 0 and self._parent is not None and os.getppid() != self._parent:
                return f"rank {first_rank} (pid {self._parent}, which started this rank) ended"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


__all__ = ["LostRank", "exit_status"]
