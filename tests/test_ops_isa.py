"""The CPU kernels of every instruction set, on one machine.

The library is built for the machine that runs it (`-march=native`), so the default suite
only exercises that machine's path (AVX-512 on the CI machine). Here the kernel tests run
again, in a fresh process, against libraries built for the other x86 targets
(`BS_LIGHTNING_MARCH`): AVX2 (`x86-64-v3`, 16 lanes as two ymm registers, the broadcast
driver from 4 rows) and the portable C++ loops (`x86-64`).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bs_lightning import ops

TESTS = Path(__file__).parent
KERNEL_TESTS = [
    "test_ops.py",
    "test_ops_tiled.py",
    "test_ops_autograd.py",
    "test_nn_linear.py",
    "test_nn_lstm.py",
]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize(
    "march, isa, needs",
    [("x86-64-v3", "avx2", {"avx2", "fma"}), ("x86-64", "portable", set())],
)
def test_kernel_tests_pass_on_every_isa(tmp_path, march, isa, needs):
    assert ops.load()
    if torch.ops.bs_lightning.cpu_isa() == isa:
        pytest.skip(f"the native build already runs the {isa} path")
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - _cpu_flags())}")
    env = {
        **os.environ,
        "BS_LIGHTNING_MARCH": march,
        "BS_LIGHTNING_CACHE": str(tmp_path),
        "BS_LIGHTNING_NO_CUDA": "1",
    }
    probe = "import torch; from bs_lightning import ops; ops.load(); print(torch.ops.bs_lightning.cpu_isa())"
    built = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=900
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip().splitlines()[-1] == isa
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
        cwd=TESTS,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
