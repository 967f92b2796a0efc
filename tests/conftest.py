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
