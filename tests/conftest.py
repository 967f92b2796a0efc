"""Shared pytest fixtures. Append new fixtures; do not rewrite others'."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model tests on one intra-op thread, then restore.

    Tiny matmuls gain nothing from a second thread, and on the shared 2-core CI machine two threads per process
    oversubscribe the cores: the model parity file ran ~8x faster with one thread (17 s vs 149 s) under load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zero_runs(tmp_path_factory):
    """The DeepSpeed ZeRO runs on the CPU (tests/zero_runs.py) — DDP reference, ZeRO-1/2/3/3-offload, ZeRO-2 killed
    and resumed, fine-tuning under ZeRO-3 — made once per session: tests/test_deepspeed_cpu.py checks the runs and
    tests/test_deepspeed_config.py converts their checkpoints. Returns the folder holding one subfolder per run."""
    pytest.importorskip("deepspeed")  # the dev extra installs it; without it the DeepSpeed tests are skipped
    from zero_runs import make_runs

    return make_runs(tmp_path_factory.mktemp("ds"))
