"""Common LightningModule logic of the word-level language models: cross-entropy over the
vocabulary, perplexity, a recurrent state carried from one BPTT window to the next."""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from bs_lightning.models.optim import build_optimizer, check_optim_args


def _detach(state):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(_detach(s) for s in state)


def _batch_size(state) -> int:
    return state.size(1) if isinstance(state, torch.Tensor) else _batch_size(state[0])


class LanguageModelModule(pl.LightningModule):
    """Base of the language models. Subclasses implement `forward(x, state) -> (logits, state)`
    with `x [batch, t]` token ids, logits `[batch, t, vocab]`; `state` is whatever the model
    carries between windows (None for none).

    Windows of one stage arrive in order (`BPTTWindows`), so the state left by window `i`
    (detached: truncated back-propagation) starts window `i + 1`; it is reset at the start of
    every epoch of every stage. Logs `{train,val,test}/loss` (mean token NLL) and
    `{train,val,test}/ppl` (perplexity over all tokens of the epoch).
    """

    test_metric = "test/ppl"
    higher_is_better = False

    def __init__(
        self,
        vocab_size: int,
        optimizer: str,
        lr: float,
        weight_decay: float,
        momentum: float,
        lr_decay: float,
        lr_decay_start: int,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if vocab_size < 2:
            raise ValueError(f"{owner}: vocab_size must be >= 2, got {vocab_size}")
        check_optim_args(owner, optimizer, lr, weight_decay, lr_decay, lr_decay_start)
        # one metric object per stage (keys "train"... would clash with Module.train)
        self.train_ppl, self.val_ppl, self.test_ppl = Perplexity(), Perplexity(), Perplexity()
        self._states: dict[str, object] = {}

    def _reset(self, stage: str) -> None:
        self._states.pop(stage, None)

    def on_train_epoch_start(self) -> None:
        self._reset("train")

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch  # [batch, t] each
        state = self._states.get(stage)
        if state is not None and _batch_size(state) != x.size(0):
            state = None
        logits, state = self(x, state)  # [batch, t, vocab]
        self._states[stage] = _detach(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        ppl = getattr(self, f"{stage}_ppl")
        ppl(logits.detach().float(), y)
        on_step = stage == "train"
        # weight each window by its token count so the epoch mean is per token
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, batch_size=y.numel())
        self.log(f"{stage}/ppl", ppl, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        return build_optimizer(self, self.hparams)
