"""Fits a small model with `BalancedPruningCallback` on 2 CPU processes over gloo, sharded
by FSDP2 (`ModelParallelStrategy`, `fully_shard`) or FSDP1 (`FSDPStrategy`,
`FullyShardedDataParallel` with `use_orig_params=True`); rank 0 writes the full state dict
and what the callback reports to `OUT/result.pt`.

    python tests/helpers/sharded_fit.py OUT fsdp2|fsdp1 [PATTERN|resume|resume-full] [BANK_SIZE]

Lightning's launcher starts rank 1 by running this script again, which is why it is a
script and not a test function.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

from bs_lightning import BalancedPruningCallback, SparsityPlan, convert_to_sparse


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` on the CPU, as it wraps a model on a GPU: the root and one
    unit per layer. Lightning refuses the exact class without a GPU and passes FSDP1 no
    device on the CPU, so the wrapping (with `device_id=cpu`) is done here first."""

    def _setup_model(self, model):
        # each weight and bias is split into two halves of their values: fc1's at row 24 (a
        # bank boundary), head's at row 2, column 2 (mid-bank), proj's [in, out] weight at
        # input 24, output 24 (its banks run along the inputs)
        model = FullyShardedDataParallel(
            model,
            device_id=torch.device("cpu"),
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear, Conv1D}),
            use_orig_params=self.kwargs["use_orig_params"],
        )
        return super()._setup_model(model)


class Net(LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        # GPT-2's Conv1D keeps weight [in, out]: FSDP2 shards its banked dimension (48 input
        # columns -> 24 + 24: whole banks of 8, not of 16)
        self.proj = Conv1D(48, 48)
        self.head = nn.Linear(48, 4)

    def configure_model(self):
        if isinstance(self.trainer.strategy, FSDPStrategy):
            return  # FSDPStrategy wraps the model itself
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.fc1, self.proj, self.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.head(torch.relu(self.proj(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g))
    return DataLoader(data, batch_size=8)


def _strategy(kind: str, distributed: bool):
    if kind == "fsdp1":
        return CPUFSDPStrategy(state_dict_type="sharded" if distributed else "full")
    return ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed
    )


def _fit(kind, model, pruner, ckpt_path=None, distributed=True, **limits) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=_strategy(kind, distributed),
        callbacks=[pruner],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **limits,
    )
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer


def _result(trainer, model, pruner) -> dict:
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return {
        "state": {k: v.detach().cpu() for k, v in full.items()},
        "report": pruner.sparsity_report(),
        "keeps": {name: layer.keep for name, layer in pruner.layers.items()},
        "plan": pruner.plan.to_dict(),
        "last_pruned_step": pruner.last_pruned_step,
    }


def main(out: str, kind: str, pattern: str = "balanced", bank: str = "8") -> None:
    """`result.pt` holds the fit ("straight", with its weights converted on rank 0) and, for
    `pattern` "resume" ("resume-full"), a fit of the same model stopped at step 4 and
    resumed from its distributed (full) checkpoint ("resumed")."""
    resume = pattern in ("resume", "resume-full")
    distributed = pattern != "resume-full"  # else one full checkpoint file
    pattern = "balanced" if resume else pattern
    options = {"bank_size": int(bank)} if pattern == "balanced" else {}

    def pruner():
        return BalancedPruningCallback(
            sparsity=0.75, pattern=pattern, frequency=2, end_step=6, verbose=False, **options
        )

    torch.manual_seed(0)
    model, callback = Net(), pruner()
    trainer = _fit(kind, model, callback, max_epochs=2)
    results = {"straight": _result(trainer, model, callback)}
    if resume:
        torch.manual_seed(0)
        model, callback = Net(), pruner()
        # the end of epoch 0 (4 steps of 2 x 8 samples): an unshuffled loader resumes there
        trainer = _fit(kind, model, callback, distributed=distributed, max_steps=4)
        trainer.save_checkpoint(f"{out}/step4.ckpt")  # a folder when distributed
        torch.manual_seed(1)  # the resumed run must not depend on its own initialisation
        model, callback = Net(), pruner()
        trainer = _fit(kind, model, callback, ckpt_path=f"{out}/step4.ckpt", max_epochs=2)
        results["resumed"] = _result(trainer, model, callback)
    if trainer.is_global_zero:
        results["straight"]["converted"] = _convert_gathered(results["straight"])
        torch.save(results, f"{out}/result.pt")


def _convert_gathered(result: dict) -> dict:
    """The gathered weights in a plain model, converted with the callback's plan."""
    plain = Net().eval()
    plain.load_state_dict(result["state"])
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = plain(x)
        convert_to_sparse(plain, plan=SparsityPlan.from_dict(result["plan"]))
        diff = (plain(x) - expected).abs().max().item()
    return {"types": {n: type(m).__name__ for n, m in plain.named_children()}, "max_diff": diff}


def check_exact_balanced_fit(result: dict) -> None:
    """The checks of a balanced fit of `helpers/sharded_fit.py` at 75%, banks of 8."""
    assert result["keeps"] == {"fc1.weight": 2, "proj.weight": 2, "head.weight": 2}
    assert result["report"]["sparsity/overall"] == pytest.approx(0.75)
    for name in ("fc1.weight", "proj.weight", "head.weight"):
        weight = result["state"][name]
        if name == "proj.weight":
            weight = weight.t()  # Conv1D [in, out]: banks along the inputs
        per_bank = (weight != 0).reshape(weight.shape[0], -1, 8).sum(-1)
        assert (per_bank == 2).all(), name  # every bank of every rank's part: 2 of 8
    planned = {e["module"]: (e["keep"], tuple(e["shape"])) for e in result["plan"]["params"]}
    assert planned == {"fc1": (2, (48, 32)), "proj": (2, (48, 48)), "head": (2, (4, 48))}
    # the full state dict loads into the plain model, which converts with the plan
    converted = result["converted"]
    assert converted["types"] == {
        "fc1": "BalancedSparseLinear",
        "proj": "BalancedSparseConv1D",
        "head": "BalancedSparseLinear",
    }
    assert converted["max_diff"] < 1e-5


def check_resume(result: dict, weights: bool = True) -> None:
    """A fit resumed at step 4 matches the uninterrupted one: masks, keep-counts, schedule
    position and (`weights`) every weight."""
    straight, resumed = result["straight"], result["resumed"]
    assert resumed["keeps"] == straight["keeps"]
    assert resumed["last_pruned_step"] == straight["last_pruned_step"] == 4
    for name, weight in straight["state"].items():
        torch.testing.assert_close(resumed["state"][name] != 0, weight != 0, rtol=0, atol=0)
        if weights:
            # masks rebuilt from each rank's zeros, then the same step-4 update: same weights
            torch.testing.assert_close(resumed["state"][name], weight, rtol=0, atol=0)


def launch(out: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs this script on 2 processes with `args` (see the module docstring), into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, __file__, str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def resumed_fit(out: Path, kind: str, full: bool = False) -> dict:
    """Launches `kind` "resume" (`full`: "resume-full") into `out`; the result of both fits.
    Lightning's sharded checkpoint is a folder, the full one a file."""
    done = launch(out, kind, "resume-full" if full else "resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "step4.ckpt").is_file() == full and (out / "step4.ckpt").exists()
    return torch.load(out / "result.pt", weights_only=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
