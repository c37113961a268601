"""Fits a small model under FSDP2 (`ModelParallelStrategy`, `fully_shard`, 2 CPU processes
over gloo) with `BalancedPruningCallback`; rank 0 writes the full state dict and what the
callback reports to `OUT/result.pt`.

    python tests/helpers/fsdp2_fit.py OUT [PATTERN|resume|resume-full] [BANK_SIZE]

Lightning's launcher starts rank 1 by running this script again, which is why it is a
script and not a test function.
"""

import sys

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

from bs_lightning import BalancedPruningCallback, SparsityPlan, convert_to_sparse


class Net(LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        # GPT-2's Conv1D keeps weight [in, out]: FSDP2 shards its banked dimension (48 input
        # columns -> 24 + 24: whole banks of 8, not of 16)
        self.proj = Conv1D(48, 48)
        self.head = nn.Linear(48, 4)

    def configure_model(self):
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


def _fit(model, pruner, ckpt_path=None, distributed=True, **limits) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed
        ),
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


def main(out: str, pattern: str = "balanced", bank: str = "8") -> None:
    """`pattern` "resume" ("resume-full"): a fit stopped at step 4 and resumed from its
    distributed (full) checkpoint, beside an uninterrupted one (`result.pt` holds both)."""
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
    trainer = _fit(model, callback, max_epochs=2)
    results = {"straight": _result(trainer, model, callback)}
    if resume:
        torch.manual_seed(0)
        model, callback = Net(), pruner()
        # the end of epoch 0 (4 steps of 2 x 8 samples): an unshuffled loader resumes there
        trainer = _fit(model, callback, distributed=distributed, max_steps=4)
        trainer.save_checkpoint(f"{out}/step4.ckpt")  # a folder when distributed
        torch.manual_seed(1)  # the resumed run must not depend on its own initialisation
        model, callback = Net(), pruner()
        trainer = _fit(model, callback, ckpt_path=f"{out}/step4.ckpt", max_epochs=2)
        results["resumed"] = _result(trainer, model, callback)
    if trainer.is_global_zero:
        if not resume:
            results["straight"]["converted"] = _convert_gathered(results["straight"])
        torch.save(results if resume else results["straight"], f"{out}/result.pt")


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


if __name__ == "__main__":
    main(*sys.argv[1:])
