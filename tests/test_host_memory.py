"""relora_dist.host_memory: freed activation memory stays in the process (no page faults every update)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.dist,
              pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")]

# Twelve 8 MiB buffers allocated, written and freed together, five times (as an update's activations); prints what
# keep_freed_memory() said and the fraction of the last three rounds' pages that were faulted in again. glibc's own
# thresholds adapt to what a process did before (why our trainer faulted more than a bare loop), so the probe first
# pins them at glibc's initial values: every such buffer mmapped, the heap trimmed at 128 KiB.
PROBE = """
import ctypes, resource, sys, torch
from relora_dist.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
libc = ctypes.CDLL(None)
assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1
said = keep_freed_memory() if sys.argv[1] == "keep" else "initial glibc thresholds"
def update():
    buffers = [torch.empty(2**21).fill_(1.0) for _ in range(12)]
    del buffers
update(); update()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    update()
print(said)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (3 * 12 * 2**23 / 4096))
"""


def probe(mode: str, **env) -> tuple[str, float]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**environment, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    said, fraction = out.stdout.strip().splitlines()
    return said, float(fraction)


def test_freed_memory_is_not_faulted_in_again():
    said, kept = probe("keep")
    assert said.startswith("glibc malloc keeps freed memory")
    assert kept < 0.1
    _, initial = probe("initial")
    assert initial > 0.5  # the premise: at glibc's initial thresholds every round's pages are faulted in again


def test_users_malloc_settings_win():
    said, faulted = probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert said == "glibc malloc settings from the environment kept"
    assert faulted > 0.5
