"""train/cli/malloc.py: a step that frees and reallocates the same memory stops paying page faults, and a user's own
allocator settings are left alone. Each case runs in a fresh interpreter: mallopt changes the process for good."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.cli.malloc import is_glibc, user_allocator_settings

ROOT = Path(__file__).resolve().parents[1]

# A training step's shape in miniature: each "step" allocates 96 MiB in 1 MiB blocks, writes them and frees them all
# (more than the 64 MiB trim threshold glibc's dynamic rule can reach; the `demo` model's steps free more than that).
# After the first free glibc serves 1 MiB blocks from the heap (mmap threshold 1 MiB, trim threshold 2 MiB). Prints
# whether the thresholds were set, then the minor page faults per step over the last 10 steps.
STEPS = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[1])
    from train.cli.malloc import tune_glibc_malloc
    print(tune_glibc_malloc() if sys.argv[2] == "tune" else None)
    def step():
        blocks = [bytearray(1 << 20) for _ in range(96)]  # zero-filled: every page is written
        del blocks
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_step(mode: str, **env: str) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES",
                                                                                                "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", STEPS, str(ROOT), mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], float(out[1])


glibc_only = pytest.mark.skipif(not is_glibc(), reason="glibc's allocator only")


@glibc_only
def test_tuned_allocator_keeps_a_steps_memory_for_the_next_step():
    said, tuned = _faults_per_step("tune")
    _, default = _faults_per_step("default")
    assert said == "True"
    # glibc's defaults give the 96 MiB back to the kernel at every step's end (> 2 MiB of free heap top): ~24,000
    # faults a step; tuned, the next step reuses the same pages
    assert default > 1000, f"glibc's default thresholds no longer trim here ({default:.0f} faults a step)"
    assert tuned < default / 20, f"{tuned:.0f} faults a step with the tuned thresholds vs {default:.0f} without"


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, {"MALLOC_ARENA_MAX": "2"}])
def test_a_users_allocator_settings_win(env):
    said, faults = _faults_per_step("tune", **env)
    assert said == "False"
    if "MALLOC_ARENA_MAX" not in env:  # the user's 128 KiB trim threshold is the one in force: faults every step
        assert faults > 1000


@pytest.mark.parametrize("env, found", [
    ({"MALLOC_PERTURB_": "85"}, "MALLOC_PERTURB_"),
    ({"MALLOC_CONF": "background_thread:true"}, "MALLOC_CONF"),  # jemalloc's
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.arena_max=2"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4", "PATH": "/usr/bin"}, "LD_PRELOAD"),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "LD_PRELOAD": "libfoo.so", "PATH": "/usr/bin"}, None),
])
def test_which_environments_count_as_the_users_allocator_settings(env, found):
    assert user_allocator_settings(env) == found
