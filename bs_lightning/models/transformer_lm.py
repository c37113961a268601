"""Small causal Transformer language model."""

import math

import torch
from torch import nn

from bs_lightning.models.language_model import LanguageModelModule


class TransformerLanguageModel(LanguageModelModule):
    """Token + learned position embeddings -> `num_layers` pre-norm `nn.TransformerEncoderLayer`
    with a causal mask -> LayerNorm -> Linear to the vocabulary. Each BPTT window is its own
    context (no state carried).

    Args:
        vocab_size: words in the vocabulary.
        d_model: model width.
        nhead: attention heads (must divide `d_model`).
        num_layers: encoder layers.
        dim_feedforward: hidden width of the feed-forward blocks (`linear1`, `linear2`).
        dropout: dropout probability.
        max_len: longest context; windows longer than this raise.
        tie_weights: share the token embedding and output weights.
        optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start: see
            `bs_lightning.models.optim.build_optimizer`.

    Raises:
        ValueError: for non-positive sizes, `d_model % nhead != 0`, dropout outside [0, 1),
            a bad optimizer setting; in `forward`, a window longer than `max_len`.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 256,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 1024,
        dropout: float = 0.2,
        max_len: int = 256,
        tie_weights: bool = True,
        optimizer: str = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        lr_decay: float = 1.0,
        lr_decay_start: int = 0,
    ) -> None:
        super().__init__(
            vocab_size, optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start
        )
        sizes = (d_model, nhead, num_layers, dim_feedforward, max_len)
        if min(sizes) < 1:
            raise ValueError(
                "TransformerLanguageModel: d_model, nhead, num_layers, dim_feedforward and "
                f"max_len must be >= 1, got {sizes}"
            )
        if d_model % nhead:
            raise ValueError(
                f"TransformerLanguageModel: nhead={nhead} must divide d_model={d_model}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"TransformerLanguageModel: dropout must be in [0, 1), got {dropout}")
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        # enable_nested_tensor only applies to padding masks, which we never use
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size)
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        """`x [batch, t]` ids -> logits `[batch, t, vocab]` and None (no carried state)."""
        t = x.size(1)
        if t > self.hparams.max_len:
            raise ValueError(
                f"TransformerLanguageModel: window of {t} tokens exceeds max_len="
                f"{self.hparams.max_len}; raise model.max_len or lower data.bptt"
            )
        pos = torch.arange(t, device=x.device)
        h = self.drop(self.embedding(x) * math.sqrt(self.hparams.d_model) + self.position(pos))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.encoder(h, mask=mask, is_causal=True)  # [batch, t, d_model]
        return self.decoder(self.norm(h)), None
