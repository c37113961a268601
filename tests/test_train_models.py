"""The recipes' LightningModules: carried LSTM state, causal Transformer, classifiers,
optimizer settings and their errors."""

import pytest
import torch

from bs_lightning.models import (
    LSTMLanguageModel,
    MLPClassifier,
    TransformerLanguageModel,
    VGGClassifier,
)
from bs_lightning.models.optim import build_optimizer

torch.set_num_threads(1)


def test_lstm_carried_state_equals_one_long_sequence():
    torch.manual_seed(0)
    model = LSTMLanguageModel(50, 8, 12, num_layers=2, dropout=0.0).eval()
    x = torch.randint(0, 50, (3, 10))
    full, _ = model(x)
    first, state = model(x[:, :6])
    second, _ = model(x[:, 6:], state)
    assert full.shape == (3, 10, 50)
    torch.testing.assert_close(torch.cat([first, second], 1), full)


def test_lstm_training_carries_detached_state_and_resets_each_epoch():
    torch.manual_seed(0)
    model = LSTMLanguageModel(50, 8, 8, dropout=0.0)
    batch = (torch.randint(0, 50, (4, 5)), torch.randint(0, 50, (4, 5)))
    model.on_train_epoch_start()
    model._step(batch, "train")
    h, c = model._states["train"]
    assert h.shape == (2, 4, 8) and not h.requires_grad and not c.requires_grad
    # a batch of another size starts from a zero state instead of failing
    model._step((batch[0][:2], batch[1][:2]), "train")
    assert model._states["train"][0].shape == (2, 2, 8)
    model.on_train_epoch_start()
    assert "train" not in model._states


def test_lstm_tied_weights_are_shared():
    model = LSTMLanguageModel(40, 16, 16, tie_weights=True)
    assert model.decoder.weight is model.embedding.weight
    with pytest.raises(ValueError, match="tie_weights=True needs embedding_dim == hidden_size"):
        LSTMLanguageModel(40, 16, 32, tie_weights=True)


def test_lstm_init_range():
    model = LSTMLanguageModel(40, 16, 16, init_range=0.05)
    assert float(model.lstm.weight_hh_l0.detach().abs().max()) <= 0.05
    assert float(model.decoder.bias.detach().abs().max()) == 0.0


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = TransformerLanguageModel(
        60, d_model=16, nhead=2, num_layers=2, dim_feedforward=32, dropout=0.0, max_len=12
    ).eval()
    x = torch.randint(0, 60, (2, 8))
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 60
    a, state = model(x)
    b, _ = model(changed)
    assert state is None and a.shape == (2, 8, 60)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    with pytest.raises(ValueError, match="exceeds max_len=12"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nhead": 3}, "nhead=3 must divide d_model=16"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"num_layers": 0}, "must be >= 1"),
    ],
)
def test_transformer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerLanguageModel(60, **{"d_model": 16, **kwargs})


def test_classifiers_shapes_and_steps():
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    for model in (MLPClassifier(10, (1, 8, 8), [32]), VGGClassifier(10, (1, 8, 8), [8, 16])):
        assert model(x).shape == (4, 10)
        loss = model.training_step((x, y), 0)
        assert loss.ndim == 0 and loss.requires_grad
    assert MLPClassifier.test_metric == "test/acc" and MLPClassifier.higher_is_better
    assert LSTMLanguageModel.test_metric == "test/ppl" and not LSTMLanguageModel.higher_is_better


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: VGGClassifier(10, (1, 8, 8), [8, 16, 32, 64]), "too small for 4 blocks"),
        (lambda: VGGClassifier(10, (1, 8, 8), [0]), "must be positive"),
        (lambda: MLPClassifier(10, (1, 8, 8), []), "hidden_sizes must be positive"),
        (lambda: MLPClassifier(1, (1, 8, 8)), "num_classes must be >= 2"),
        (lambda: MLPClassifier(10, (64,), optimizer="adam"), r"unknown optimizer 'adam'.*adamw"),
        (lambda: MLPClassifier(10, (64,), lr=0), "lr must be > 0"),
        (lambda: MLPClassifier(10, (64,), lr_decay=1.5), r"lr_decay must be in \(0, 1\]"),
        (lambda: LSTMLanguageModel(1), "vocab_size must be >= 2"),
        (lambda: LSTMLanguageModel(10, weight_decay=-1), "weight_decay must be >= 0"),
    ],
)
def test_model_errors_name_the_model_and_parameter(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_lr_decays_per_epoch_from_decay_start():
    model = LSTMLanguageModel(20, 4, 4, lr=1.0, lr_decay=0.5, lr_decay_start=2)
    config = build_optimizer(model, model.hparams)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and config["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # epochs 0 and 1 at lr, then halved after every epoch from epoch 2 on
    assert lrs == [1.0, 1.0, 0.5, 0.25]
