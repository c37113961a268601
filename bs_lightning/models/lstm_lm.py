"""Word-level LSTM language model of Zaremba, Sutskever & Vinyals 2014 ("Recurrent neural
network regularization")."""

import torch
from torch import nn

from bs_lightning.models.language_model import LanguageModelModule


class LSTMLanguageModel(LanguageModelModule):
    """Embedding -> dropout -> multi-layer LSTM (dropout between layers) -> dropout -> Linear
    to the vocabulary. The hidden state is carried across BPTT windows; clip gradients with
    the Trainer's `gradient_clip_val` (Zaremba: 5 for small/medium, 10 for large).

    Zaremba's sizes: small 200 (no dropout), medium 650 (dropout 0.5), large 1500
    (dropout 0.65); 2 layers, 35-step BPTT, batch 20, SGD lr 1 decayed per epoch on the loss
    summed over the 35 steps, which is lr ~20-35 on our loss (mean over tokens).

    Args:
        vocab_size: words in the vocabulary.
        embedding_dim: embedding width (= LSTM input size).
        hidden_size: LSTM units per layer.
        num_layers: stacked LSTM layers.
        dropout: dropout on non-recurrent connections.
        tie_weights: share the embedding and output weights (Press & Wolf 2017).
        init_range: weights start uniform in `[-init_range, init_range]`, biases at 0.
        optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start: see
            `bs_lightning.models.optim.build_optimizer`.

    Raises:
        ValueError: for non-positive sizes, dropout outside [0, 1), `tie_weights` with
            `embedding_dim != hidden_size`, or a bad optimizer setting.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 650,
        hidden_size: int = 650,
        num_layers: int = 2,
        dropout: float = 0.5,
        tie_weights: bool = False,
        init_range: float = 0.05,
        optimizer: str = "sgd",
        lr: float = 20.0,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        lr_decay: float = 0.8,
        lr_decay_start: int = 6,
    ) -> None:
        super().__init__(
            vocab_size, optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start
        )
        if min(embedding_dim, hidden_size, num_layers) < 1:
            raise ValueError(
                "LSTMLanguageModel: embedding_dim, hidden_size and num_layers must be >= 1, got "
                f"{embedding_dim}, {hidden_size}, {num_layers}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"LSTMLanguageModel: dropout must be in [0, 1), got {dropout}")
        if tie_weights and embedding_dim != hidden_size:
            raise ValueError(
                "LSTMLanguageModel: tie_weights=True needs embedding_dim == hidden_size, got "
                f"{embedding_dim} and {hidden_size}"
            )
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden_size,
            num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.decoder = nn.Linear(hidden_size, vocab_size)
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`x [batch, t]` ids, `state` `(h, c)` each `[num_layers, batch, hidden]` or None ->
        logits `[batch, t, vocab]` and the new `(h, c)`."""
        emb = self.drop(self.embedding(x))  # [batch, t, embedding_dim]
        out, state = self.lstm(emb, state)  # [batch, t, hidden]
        return self.decoder(self.drop(out)), state
