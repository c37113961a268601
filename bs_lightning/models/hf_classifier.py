"""Hugging Face sequence classifier (e.g. all-MiniLM-L6-v2 + a new head) as a LightningModule."""

import torch

from bs_lightning.hf.paths import resolve_model_path
from bs_lightning.models.classifier import ClassifierModule


class HFSequenceClassifier(ClassifierModule):
    """`AutoModelForSequenceClassification` from a pretrained model, fine-tuned end to end.

    The encoder comes from `pretrained`; the classification head (and the pooler when the
    checkpoint lacks one) is freshly initialised. Input is `x [batch, t]` token ids padded with
    `pad_token_id` (as `bs_lightning.data.sst2.SST2DataModule` yields); the attention mask is
    `x != pad_token_id`. The HF model is `self.net`, so its layers are named
    `net.bert.encoder.layer.0.attention.self.query`, ... for the pruning callback's globs.

    Args:
        num_classes: output classes (from the data module).
        pad_token_id: the tokenizer's pad id (from the data module); padding positions are
            masked out of attention.
        pretrained: model folder or name (see `bs_lightning.hf.paths.resolve_model_path`).
        classifier_dropout: dropout before the head; None keeps the config's.
        optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start: see
            `bs_lightning.models.optim.build_optimizer`.

    Raises:
        ValueError: for `pad_token_id < 0`, `classifier_dropout` outside [0, 1), or a bad
            optimizer setting.
    """

    def __init__(
        self,
        num_classes: int,
        pad_token_id: int,
        pretrained: str = "all-MiniLM-L6-v2",
        classifier_dropout: float | None = None,
        optimizer: str = "adamw",
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        lr_decay: float = 1.0,
        lr_decay_start: int = 0,
    ) -> None:
        super().__init__(
            num_classes, optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start
        )
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"HFSequenceClassifier: pad_token_id must be >= 0, got {pad_token_id}")
        if classifier_dropout is not None and not 0 <= classifier_dropout < 1:
            raise ValueError(
                f"HFSequenceClassifier: classifier_dropout must be in [0, 1) or None, got "
                f"{classifier_dropout}"
            )
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification

        extra = {} if classifier_dropout is None else {"classifier_dropout": classifier_dropout}
        self.net = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(pretrained), num_labels=num_classes, **extra
        )
        # from_pretrained returns the model in eval mode and Lightning keeps every module's
        # mode: without this, dropout would stay off during fine-tuning
        self.net.train()
        # decoder-only models (GPT-2) find the last real token through the config's pad id
        self.net.config.pad_token_id = pad_token_id
        self.pad_token_id = pad_token_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [batch, t]` token ids -> logits `[batch, num_classes]`."""
        return self.net(input_ids=x, attention_mask=(x != self.pad_token_id).long()).logits
