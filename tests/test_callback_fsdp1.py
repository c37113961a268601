"""Under FSDP1 (`FSDPStrategy`, `use_orig_params=True`, 2 CPU processes over gloo) each rank
holds a 1-D piece of every weight that starts mid-row and mid-bank; the callback gathers one
unit at a time to rank whole matrices, so every pattern prunes exactly, and each rank masks
its own piece of the weights, gradients and optimizer state."""

import pytest
import torch
import torch.distributed as dist
from helpers.sharded_fit import check_exact_balanced_fit, check_resume, launch, resumed_fit
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from bs_lightning.callbacks.flat_sharding import flat_shards, local_piece


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """One launch: a fit, and the same fit stopped at step 4 and resumed from Lightning's
    sharded checkpoint (`state_dict_type="sharded"`)."""
    return resumed_fit(tmp_path_factory.mktemp("fsdp1"), "fsdp1")


def test_fsdp1_fit_reaches_exact_balanced_banks_across_mid_bank_shards(resumed):
    check_exact_balanced_fit(resumed["straight"])


def test_fsdp1_resume_from_the_sharded_checkpoint_equals_an_uninterrupted_fit(resumed):
    check_resume(resumed)


@pytest.mark.slow  # the default suite's sharded tests stay near a minute
def test_fsdp1_resume_from_a_full_checkpoint_keeps_masks_and_schedule(tmp_path):
    # weights are not compared: FSDP1's full optimizer checkpoint on CPU/gloo comes back with
    # Adam's first moment equal to its second (torch 2.14), with or without this callback
    check_resume(resumed_fit(tmp_path, "fsdp1", full=True), weights=False)


def test_fsdp1_prunes_patterns_that_rank_the_whole_matrix_exactly(tmp_path):
    done = launch(tmp_path, "fsdp1", "unstructured")
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)["straight"]
    assert result["report"]["sparsity/overall"] == pytest.approx(0.75)
    for name in ("fc1.weight", "proj.weight", "head.weight"):
        weight = result["state"][name]
        assert int((weight != 0).sum()) == result["keeps"][name] == weight.numel() // 4, name


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_flat_shards_locate_each_parameter_and_refuse_flat_parameters(one_process_group):
    def wrapped(orig):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
        params = [model[0].weight, model[1].weight]
        unit = FSDP(model, device_id=torch.device("cpu"), use_orig_params=orig)
        return unit, params

    unit, (first, second) = wrapped(True)
    shards = flat_shards(unit, [first, second], "FSDPStrategy")
    # one process: FSDP1 does not shard, and each parameter keeps its shape
    assert [(s.unit, s.start, s.stop, s.shape) for s in shards.values()] == [
        (unit, 0, 24, (4, 6)),
        (unit, 0, 12, (3, 4)),
    ]
    with FSDP.summon_full_params(unit, recurse=False):
        full = second.detach().clone()
    torch.testing.assert_close(local_piece(full, shards[id(second)]), second.detach())
    unit, params = wrapped(False)
    with pytest.raises(RuntimeError, match="FSDPStrategy with use_orig_params=False"):
        flat_shards(unit, params, "FSDPStrategy")
