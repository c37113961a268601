"""Under FSDP2 (ModelParallelStrategy + fully_shard, 2 CPU processes over gloo) every rank
prunes its own rows: the gathered weights hold exact balanced banks, the logged sparsity is
global, and patterns that rank a whole matrix are refused before any weight changes."""

import pytest
import torch.distributed as dist
from helpers.sharded_fit import check_exact_balanced_fit, check_resume, launch, resumed_fit
from torch import nn
from transformers.pytorch_utils import Conv1D

from bs_lightning.callbacks.sharding import check_shardable
from bs_lightning.sparsity import BalancedPattern, UnstructuredPattern, find_prunable


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """One launch: a fit, and the same fit stopped at step 4 and resumed from Lightning's
    distributed checkpoint."""
    return resumed_fit(tmp_path_factory.mktemp("fsdp2"), "fsdp2")


def test_fsdp2_fit_reaches_exact_balanced_banks(resumed):
    # the Conv1D's banked input dimension is sharded 24 + 24: whole banks of 8
    check_exact_balanced_fit(resumed["straight"])


def test_fsdp2_resume_from_the_distributed_checkpoint_equals_an_uninterrupted_fit(resumed):
    check_resume(resumed)


@pytest.mark.slow  # the default suite's sharded tests stay near a minute
def test_fsdp2_resume_from_a_full_checkpoint_equals_an_uninterrupted_fit(tmp_path):
    check_resume(resumed_fit(tmp_path, "fsdp2", full=True))


def test_fsdp2_refuses_a_pattern_that_ranks_the_whole_matrix(tmp_path):
    done = launch(tmp_path, "fsdp2", "unstructured")
    assert done.returncode != 0
    assert "pattern 'unstructured' ranks weights across a whole matrix" in done.stderr
    assert not (tmp_path / "result.pt").exists()


def test_fsdp2_refuses_shards_that_split_banks(tmp_path):
    # banks of 16 across the Conv1D's 24 + 24 sharded input columns
    done = launch(tmp_path, "fsdp2", "balanced", "16")
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
