"""Kernel build and loading: cache key, the failed-build fallback, the --info command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bs_lightning import _build

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from bs_lightning import ops

    values = torch.tensor([[3.0, 4.0, 7.0, 8.0]])
    indices = torch.tensor([[2, 3, 2, 3]], dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.balanced_linear(torch.ones(1, 8), values, indices, 4, 8)
        second = ops.balanced_linear(torch.eye(8), values, indices, 4, 8)
    ours = [w for w in caught if "compiled kernels unavailable" in str(w.message)]
    print("warnings", len(ours), ours[0].category.__name__ if ours else None)
    print("backend", ops.backend("cpu"))
    print("first", first.flatten().tolist())
    print("second", second.flatten().tolist())
    """
)


def run_python(args, env_extra, timeout=600):
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_failed_build_warns_once_and_uses_reference(tmp_path):
    # A compiler that always fails: the package must keep working on the reference path.
    result = run_python(
        ["-c", FALLBACK_SCRIPT],
        {"BS_LIGHTNING_CACHE": str(tmp_path), "CXX": "/bin/false", "BS_LIGHTNING_NO_CUDA": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["warnings"] == "1 RuntimeWarning"
    assert lines["backend"] == "reference"
    assert lines["first"] == "[22.0]"
    assert lines["second"] == "[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]"
    assert _build.BUILD_MESSAGE in result.stderr


def test_no_build_env_without_cache_falls_back(tmp_path):
    result = run_python(
        ["-m", "bs_lightning.ops", "--build"],
        {"BS_LIGHTNING_CACHE": str(tmp_path), "BS_LIGHTNING_NO_BUILD": "1"},
    )
    assert result.returncode == 1
    assert "no cached library" in result.stderr and "BS_LIGHTNING_NO_BUILD=1" in result.stderr


def test_info_names_the_active_backend():
    assert _build.load()
    result = run_python(["-m", "bs_lightning.ops", "--info"], {})
    assert result.returncode == 0, result.stderr
    assert "backend cpu: compiled-cpu" in result.stdout
    assert f"library: {_build._state['path']}" in result.stdout


def test_cache_key_follows_sources_and_flags(tmp_path, monkeypatch):
    copy = tmp_path / "csrc"
    shutil.copytree(_build.csrc_dir(), copy)
    monkeypatch.setattr(_build, "csrc_dir", lambda: copy)
    monkeypatch.setenv("BS_LIGHTNING_NO_CUDA", "1")
    args = _build._build_args()
    tag = _build.build_tag(args)
    assert _build.build_tag(_build._build_args()) == tag  # stable
    kernel = copy / "cpu" / "balanced_linear_cpu.cpp"
    kernel.write_text(kernel.read_text() + "\n// edited\n")
    assert _build.build_tag(_build._build_args()) != tag
    header = copy / "balanced_linear.h"
    before = _build.build_tag(_build._build_args())
    header.write_text(header.read_text() + "\n// edited\n")
    assert _build.build_tag(_build._build_args()) != before
    flags = {**args, "extra_cflags": [*args["extra_cflags"], "-DEXTRA"]}
    assert _build.build_tag(flags) != _build.build_tag(args)


def test_cuda_sources_and_arch_flags(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert _build._cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert _build._cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    monkeypatch.setenv("BS_LIGHTNING_NO_CUDA", "1")
    assert _build.cuda_home() is None
    assert _build._sources()[1] == []
    assert not _build._build_args()["with_cuda"]


@pytest.mark.skipif(
    torch.version.cuda is None or not Path("/usr/local/cuda/bin/nvcc").is_file(),
    reason="needs torch's CUDA build and the CUDA toolkit at /usr/local/cuda",
)
def test_cuda_kernels_compiled_only_with_a_gpu_or_when_asked(monkeypatch):
    monkeypatch.delenv("BS_LIGHTNING_NO_CUDA", raising=False)
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("BS_LIGHTNING_BUILD_CUDA", raising=False)
    assert _build.cuda_home() is None
    assert _build._sources()[1] == []
    monkeypatch.setenv("BS_LIGHTNING_BUILD_CUDA", "1")
    assert _build.cuda_home() == "/usr/local/cuda"
    assert _build._sources()[1], "csrc/cuda/*.cu should be compiled when asked for"
    monkeypatch.delenv("BS_LIGHTNING_BUILD_CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _build.cuda_home() == "/usr/local/cuda"
