"""Freed host memory goes back to the system after a teacher-forced layer."""

import platform
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap behaviour")
def test_freed_block_tensors_leave_the_process():
    """The pattern of a teacher-forced layer, in a fresh process: a large tensor freed (glibc
    then serves mid-sized ones from its heap), then many block-sized tensors interleaved with
    small long-lived ones and freed. Their pages stay mapped until released (with this
    machine's torch build; other builds allocate differently, and the pages may leave sooner:
    either way none may remain after the release)."""
    script = textwrap.dedent(
        """
        import torch
        from lesskv.core.memory import release_freed_memory

        def rss_mib():
            status = open("/proc/self/status").read()
            return int(status.split("VmRSS:")[1].split()[0]) / 1024

        large = torch.ones(20 * 2**18)  # 20 MiB
        del large
        before = rss_mib()
        blocks, small = [], []
        for _ in range(100):
            blocks.append(torch.ones(3 * 2**18))  # 3 MiB each
            small.append(torch.ones(16))
        del blocks
        release_freed_memory()
        print(rss_mib() - before)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 30  # of the 300 MiB allocated and freed
