"""The CPU training process's glibc allocator policy (ilstudio.training.allocator), for real:
in a fresh process, blocks freed in a pattern that glibc's adaptive defaults keep (a large
block freed first raises the threshold; then every other 4 MiB block is freed, leaving holes
that cannot be trimmed) go back to the system under the policy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ilstudio.training import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")

CHILD = textwrap.dedent("""
    import sys
    from ilstudio.training import allocator

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    said = allocator.configure() if sys.argv[1] == "policy" else "defaults"
    big = bytearray(16 * 2**20)  # glibc maps it; freeing it raises its threshold to 16 MiB
    del big
    blocks = [bytearray(4 * 2**20) for _ in range(60)]  # 240 MiB, touched (zero-filled)
    before = rss()
    del blocks[::2]  # 120 MiB freed, in holes between live blocks
    print(round(before - rss()), said)
""")


def _freed_mib(mode: str, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env={**clean, **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout.split(maxsplit=1)
    return int(out[0]), out[1].strip()


def test_policy_gives_freed_blocks_back():
    with_policy, said = _freed_mib("policy")
    without, _ = _freed_mib("defaults")
    assert "go back to the system" in said
    assert with_policy >= 110, with_policy  # the 120 MiB freed left the process
    assert without <= 20, without  # glibc's defaults keep them: what the policy is for


def test_user_setting_wins():
    freed, said = _freed_mib("policy", MALLOC_MMAP_THRESHOLD_="67108864")
    assert "set by the user, left as is" in said and "MALLOC_MMAP_THRESHOLD_" in said
    assert freed <= 20, freed  # the user's 64 MiB threshold applies, not the policy's


def test_configure_names_the_user_variable():
    assert "MALLOC_TRIM_THRESHOLD_" in allocator.configure({"MALLOC_TRIM_THRESHOLD_": "0"})
