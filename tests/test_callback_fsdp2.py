"""Under FSDP2 (ModelParallelStrategy + fully_shard, 2 CPU processes over gloo) every rank
prunes its own rows: the gathered weights hold exact balanced banks, the logged sparsity is
global, and patterns that rank a whole matrix are refused before any weight changes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers.pytorch_utils import Conv1D

from bs_lightning.callbacks.sharding import check_shardable
from bs_lightning.sparsity import BalancedPattern, UnstructuredPattern, find_prunable

SCRIPT = Path(__file__).parent / "helpers" / "fsdp2_fit.py"


def _fit(tmp_path, *args) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_fsdp2_fit_reaches_exact_balanced_banks(tmp_path):
    done = _fit(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["keeps"] == {"fc1.weight": 2, "proj.weight": 2, "head.weight": 2}
    assert result["report"]["sparsity/overall"] == pytest.approx(0.75)
    for name in ("fc1.weight", "proj.weight", "head.weight"):
        weight = result["state"][name]
        if name == "proj.weight":
            weight = weight.t()  # Conv1D [in, out]: its input columns were sharded 24 + 24
        per_bank = (weight != 0).reshape(weight.shape[0], -1, 8).sum(-1)
        assert (per_bank == 2).all(), name  # every bank of every rank's part: 2 of 8
    planned = {e["module"]: e["keep"] for e in result["plan"]["params"]}
    assert planned == {"fc1": 2, "proj": 2, "head": 2}
    # the full state dict loads into the plain model, which converts with the plan
    converted = result["converted"]
    assert converted["types"] == {
        "fc1": "BalancedSparseLinear",
        "proj": "BalancedSparseConv1D",
        "head": "BalancedSparseLinear",
    }
    assert converted["max_diff"] < 1e-5


def test_fsdp2_refuses_a_pattern_that_ranks_the_whole_matrix(tmp_path):
    done = _fit(tmp_path, "unstructured")
    assert done.returncode != 0
    assert "pattern 'unstructured' ranks weights across a whole matrix" in done.stderr
    assert not (tmp_path / "result.pt").exists()


def test_fsdp2_refuses_shards_that_split_banks(tmp_path):
    # banks of 16 across the Conv1D's 24 + 24 sharded input columns
    done = _fit(tmp_path, "balanced", "16")
    assert done.returncode != 0
    assert "splits the columns of 'proj.weight' (48 along dim 0 in 2 shards)" in done.stderr
    assert not (tmp_path / "result.pt").exists()


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_checks_name_the_parameter_and_the_pattern(one_process_group):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    model = nn.Sequential(nn.Linear(16, 8), Conv1D(8, 12))  # Conv1D weight [in=12, out=8]
    for module in model:
        module.weight = nn.Parameter(distribute_tensor(module.weight.detach(), mesh, [Shard(0)]))
    linear, conv1d = find_prunable(model)
    check_shardable(linear, BalancedPattern(8), "ModelParallelStrategy")
    check_shardable(conv1d, BalancedPattern(8), "ModelParallelStrategy")  # one shard: no split
    with pytest.raises(ValueError, match="pattern 'unstructured' ranks weights across a whole"):
        check_shardable(linear, UnstructuredPattern(), "ModelParallelStrategy")


@pytest.mark.parametrize(
    "kind", ["resume", pytest.param("resume-full", marks=pytest.mark.slow)]
)  # the default suite's FSDP2 tests stay near a minute
def test_fsdp2_resume_equals_an_uninterrupted_fit(tmp_path, kind):
    done = _fit(tmp_path, kind)
    assert done.returncode == 0, done.stderr[-2000:]
    # Lightning's sharded checkpoint is a folder, the full one a file
    assert (tmp_path / "step4.ckpt").is_dir() == (kind == "resume")
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    straight, resumed = result["straight"], result["resumed"]
    assert resumed["keeps"] == straight["keeps"]
    assert resumed["last_pruned_step"] == straight["last_pruned_step"] == 4
    for name, weight in straight["state"].items():
        # masks rebuilt from each rank's zeros, then the same step-4 update: same weights
        torch.testing.assert_close(resumed["state"][name], weight, rtol=0, atol=0)
