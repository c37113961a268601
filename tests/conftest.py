"""Shared test fixtures: a tiny model holding every prunable layer type, data, a logger.

Classes live at module level so `ddp_spawn` workers can unpickle them.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

# The test machine has 2 shared cores. With 2 intra-op threads, tiny ops in concurrent test
# processes oversubscribe the cores and run 30-60x slower than with 1 thread (measured).
torch.set_num_threads(1)
# fp32 references on a GPU in full fp32: cuDNN (LSTM, conv) allows TF32 by default, which
# misses the kernels' 1e-4 tolerances
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


class TinyZoo(LightningModule):
    """Conv2d -> 2-layer bidirectional LSTM -> GPT-2 Conv1D -> TransformerEncoderLayer -> Linear.

    Input `[B, 2, 6, 6]`, output logits `[B, 4]`. With `bank_size=8` every prunable row is at
    least 16 long; the conv rows (2 * 3 * 3 = 18) end in a short bank of 2 columns.
    """

    def __init__(self, lr: float = 1e-2, optimizer: str = "adamw"):
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(2, 16, 3)  # [B, 16, 4, 4]
        self.lstm = nn.LSTM(16, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.proj = Conv1D(16, 32)  # GPT-2 style, weight [32, 16]
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, 16 positions, 16 channels]
        h, _ = self.lstm(h)  # [B, 16, 32]
        h = self.encoder(self.proj(h.contiguous()))  # [B, 16, 16]
        return self.head(h.mean(1))  # [B, 4]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)


def random_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Random images `[n, 2, 6, 6]` with labels in [0, 4); not shuffled (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)
    )
    return DataLoader(data, batch_size=batch_size)


def quiet_trainer(callbacks: list, max_epochs: int = 1, **kwargs) -> Trainer:
    """A CPU `Trainer` with no logger, progress bar, model summary or checkpointing."""
    return Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


class MemoryLogger(Logger):
    """Keeps every `log_metrics` call as `(step, metrics)` in `self.records`."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


@pytest.fixture
def tiny_zoo() -> TinyZoo:
    torch.manual_seed(0)
    return TinyZoo()


@pytest.fixture
def memory_logger() -> MemoryLogger:
    return MemoryLogger()


@pytest.fixture(autouse=True)
def _rule_dispatch(monkeypatch):
    """Sparse modules choose tiles or the dense copy by the rule, not by timing: tests never
    time anything, and which kernel runs stays deterministic (`test_dispatch.py` tests the
    measured choice with a fake clock)."""
    from bs_lightning.nn.base import BalancedSparseModule

    monkeypatch.setattr(BalancedSparseModule, "measured_dispatch", False)
