"""Under DDP (2 CPU processes, gloo) every rank holds identical masks and weights."""

import copy

import torch
import torch.distributed as dist
from conftest import TinyZoo, random_loader
from lightning.pytorch import Callback, Trainer

from bs_lightning import BalancedPruningCallback


class DumpMasks(Callback):
    """Saves each rank's masks and weights, and what `_broadcast` makes of a per-rank mask."""

    def __init__(self, pruner: BalancedPruningCallback, out_dir: str):
        self.pruner = pruner
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        rank = dist.get_rank()
        differs = torch.tensor([rank == 0, rank == 1, True])  # a different mask on each rank
        torch.save(
            {
                "world_size": dist.get_world_size(),
                "masks": {n: layer.mask.cpu() for n, layer in self.pruner.layers.items()},
                "keeps": {n: layer.keep for n, layer in self.pruner.layers.items()},
                "weights": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                "broadcast": self.pruner._broadcast(differs),
            },
            f"{self.out_dir}/rank{rank}.pt",
        )


def _ddp_trainer(callbacks: list, epochs: int) -> Trainer:
    """Two CPU processes over gloo, spawned (so the test process keeps its model)."""
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def test_ddp_ranks_hold_identical_masks(tmp_path):
    torch.manual_seed(0)
    pruner = BalancedPruningCallback(
        sparsity=0.75, bank_size=8, frequency=2, end_step=6, verbose=False
    )
    _ddp_trainer([pruner, DumpMasks(pruner, str(tmp_path))], epochs=2).fit(
        TinyZoo(), random_loader()
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["keeps"] == ranks[1]["keeps"]
    assert set(ranks[0]["keeps"].values()) == {2}
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() and len(ranks[0]["masks"]) == 15
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
        assert mask.float().mean() <= 0.3
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    expected = torch.tensor([True, False, True])  # rank 0's mask
    assert torch.equal(ranks[0]["broadcast"], expected)
    assert torch.equal(ranks[1]["broadcast"], expected)


def test_ddp_sparsegpt_one_shot_uses_rank_zeros_result(tmp_path):
    # each rank calibrates on its own shard of the batches: rank 0's weights and masks must
    # reach rank 1 (lr 0 keeps them as pruned)
    torch.manual_seed(0)
    include = ["conv", "proj", "encoder.linear*", "head"]
    pruner = BalancedPruningCallback(
        0.75, bank_size=8, schedule="one_shot", start_step=1, include=include,
        method="sparsegpt", calibration_batches=2, verbose=False,
    )  # fmt: skip
    model = TinyZoo(lr=0.0, optimizer="sgd")
    dense = copy.deepcopy(model)  # ddp_spawn loads rank 0's weights back into `model`
    _ddp_trainer([pruner, DumpMasks(pruner, str(tmp_path))], epochs=1).fit(model, random_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert set(ranks[0]["keeps"].values()) == {2} and len(ranks[0]["masks"]) == 5
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    # SparseGPT moved the kept weights off their dense values
    head = ranks[0]["weights"]["head.weight"]
    assert not torch.equal(
        head[ranks[0]["masks"]["head.weight"]], dense.head.weight[ranks[0]["masks"]["head.weight"]]
    )
