"""Common LightningModule logic of the word-level language models: cross-entropy over the
vocabulary, perplexity, a recurrent state carried from one BPTT window to the next."""

import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from bs_lightning.models.recipe_module import RecipeModule


def _detach(state):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(_detach(s) for s in state)


def _batch_size(state) -> int:
    return state.size(1) if isinstance(state, torch.Tensor) else _batch_size(state[0])


class LanguageModelModule(RecipeModule):
    """Base of the language models. Subclasses implement `forward(x, state) -> (logits, state)`
    with `x [batch, t]` token ids, logits `[batch, t, vocab]`; `state` is whatever the model
    carries between windows (None for none).

    Windows of one stage arrive in order (`BPTTWindows`), so the state left by window `i`
    (detached: truncated back-propagation) starts window `i + 1`; it is reset at the start of
    every epoch of every stage. Logs `{train,val,test}/loss` (mean token NLL) and
    `{train,val,test}/ppl` (perplexity over all tokens of the epoch).

    Args:
        vocab_size: words in the vocabulary, >= 2.
        optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start: see
            `bs_lightning.models.optim.build_optimizer` (read back from `self.hparams`).

    Raises:
        ValueError: naming the model class, for `vocab_size < 2` or a bad optimizer setting.
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
        super().__init__(
            "vocab_size", vocab_size, optimizer, lr, weight_decay, lr_decay, lr_decay_start
        )
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
        # weight each window by its token count so the epoch mean is per token
        self._log_stage(stage, loss, "ppl", ppl, batch_size=y.numel())
        return loss
