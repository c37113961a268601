"""BalancedPruningCallback inside a real Trainer.fit on a model with every prunable layer type."""

import logging

import pytest
import torch
from conftest import TinyZoo, random_loader
from lightning.pytorch import Callback, Trainer

from bs_lightning import BalancedPruningCallback, SparsityPlan
from bs_lightning.sparsity import bank_layout, matrix_view

EXPECTED_LAYERS = [
    "conv.weight",
    *[f"lstm.weight_{w}_l{i}{d}" for i in (0, 1) for d in ("", "_reverse") for w in ("ih", "hh")],
    "proj.weight",
    "encoder.self_attn.in_proj_weight",
    "encoder.self_attn.out_proj.weight",
    "encoder.linear1.weight",
    "encoder.linear2.weight",
    "head.weight",
]


class ZeroChecker(Callback):
    """Checks after every optimizer step that pruned weights are exact zeros, that pruned
    gradients were zeroed before the step and that keep-counts never go up."""

    def __init__(self, pruner: BalancedPruningCallback):
        self.pruner = pruner
        self.keeps: list[dict[str, int]] = []
        self.grad_checks = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for layer in self.pruner.layers.values():
            if layer.mask is not None and layer.entry.param.grad is not None:
                assert (layer.entry.param.grad[~layer.mask] == 0).all(), layer.entry.name
                self.grad_checks += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        keeps = {name: layer.keep for name, layer in self.pruner.layers.items()}
        if self.keeps:
            assert all(keeps[n] <= self.keeps[-1][n] for n in keeps)
        self.keeps.append(keeps)
        for layer in self.pruner.layers.values():
            if layer.mask is not None:
                assert (layer.entry.param[~layer.mask] == 0).all(), layer.entry.name


def fit(model, pruner, logger=False, epochs=5, **trainer_kwargs):
    checker = ZeroChecker(pruner)
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[pruner, checker],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.fit(model, random_loader())
    return trainer, checker


def assert_balanced(module, param_name, bank_size, k):
    """Every full bank of the weights' matrix view holds exactly k non-zeros; the short last
    bank holds k_last (ARCHITECTURE.md section 1)."""
    matrix = matrix_view(module, param_name).detach()
    rows, length = matrix.shape
    n_banks, k_last = bank_layout(length, bank_size, k)
    nonzero = matrix != 0
    full = length // bank_size
    assert (nonzero[:, : full * bank_size].reshape(rows, full, bank_size).sum(-1) == k).all()
    if n_banks > full:
        assert (nonzero[:, full * bank_size :].sum(-1) == k_last).all()


def test_fit_reaches_target_and_stays(tiny_zoo, memory_logger, caplog):
    pruner = BalancedPruningCallback(sparsity=0.75, bank_size=8, frequency=5, end_step=20)
    # pruning is in place: the LSTM's parameters keep their storage (cuDNN's flat weights)
    storage = [p.data_ptr() for p in tiny_zoo.lstm._flat_weights]
    # lightning's logger does not propagate to the root logger that caplog listens on
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        trainer, checker = fit(tiny_zoo, pruner, logger=memory_logger)
    finally:
        lightning_logger.removeHandler(caplog.handler)
    printed = caplog.text
    assert trainer.global_step == 40
    assert list(pruner.layers) == EXPECTED_LAYERS
    assert [p.data_ptr() for p in tiny_zoo.lstm._flat_weights] == storage
    assert tiny_zoo.lstm._flat_weights[1] is tiny_zoo.lstm.weight_hh_l0
    for layer in pruner.layers.values():
        assert layer.keep == 2
        assert_balanced(layer.entry.module, layer.entry.param_name, 8, 2)
    # the GPT-2 Conv1D weight [in=32, out=16] has banks along its first (input) dimension
    proj = tiny_zoo.proj.weight.detach()
    assert ((proj != 0).reshape(4, 8, 16).sum(1) == 2).all()
    plan = pruner.plan
    assert plan["lstm.weight_hh_l1_reverse"].compact_layout == (8, 2)
    assert {p: e.compact_layout for p, e in plan.modules()["proj"].items()} == {"weight": (8, 2)}
    assert SparsityPlan.recorded(tiny_zoo) == plan
    # conv rows have 18 columns: banks 8, 8, 2 keep 2, 2, 1 -> 5 of 18
    assert pruner.layers["conv.weight"].effective == pytest.approx(13 / 18)
    # the target stays in place after end_step: the last 20 steps keep the final counts
    assert all(keeps == checker.keeps[-1] for keeps in checker.keeps[20:])
    assert checker.grad_checks > 0
    # logged whenever masks changed (cubic from step 0: steps 5, 10, 15 lower k here)
    steps = [step for step, metrics in memory_logger.records if "sparsity/overall" in metrics]
    assert steps == [5, 10, 15]
    overall = [m["sparsity/overall"] for _, m in memory_logger.records if "sparsity/overall" in m]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(
        pruner.sparsity_report()["sparsity/overall"]
    )
    last = [m for _, m in memory_logger.records if "sparsity/overall" in m][-1]
    assert last["sparsity/lstm.weight_ih_l0"] == 0.75
    assert "BalancedPruningCallback summary" in printed
    assert (
        "| encoder.self_attn.in_proj_weight | 48x16 | balanced | 2 | 0.7500 | 0.7500 |" in printed
    )


def test_final_checkpoint_loads_into_plain_model(tiny_zoo, tmp_path):
    pruner = BalancedPruningCallback(
        sparsity=0.5, bank_size=8, frequency=4, end_step=12, verbose=False
    )
    trainer, _ = fit(tiny_zoo, pruner, epochs=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    plain = TinyZoo()
    result = plain.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name in EXPECTED_LAYERS:
        module_name, param_name = name.rsplit(".", 1)
        assert_balanced(plain.get_submodule(module_name), param_name, 8, 4)


@pytest.mark.parametrize(
    ("optimizer", "precision"),
    [("adamw", "bf16-mixed"), ("sgd", "32-true"), ("adamw", "bf16-true")],
)
def test_zeros_hold_with_optimizer_state_and_precision(optimizer, precision):
    torch.manual_seed(0)
    model = TinyZoo(optimizer=optimizer)
    pruner = BalancedPruningCallback(
        sparsity=0.75, bank_size=8, frequency=3, end_step=9, verbose=False
    )
    trainer, checker = fit(model, pruner, epochs=2, precision=precision)
    assert len(checker.keeps) == 16
    opt = trainer.optimizers[0]
    for layer in pruner.layers.values():
        assert layer.keep == 2
        assert_balanced(layer.entry.module, layer.entry.param_name, 8, 2)
        # optimizer state at pruned positions was cleared and stayed clear
        for value in opt.state[layer.entry.param].values():
            if value.shape == layer.mask.shape:
                assert (value[~layer.mask] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "target"),
    [
        ({"pattern": "nm", "n": 2, "m": 4, "include": ["lstm", "encoder.*", "head"]}, 0.5),
        ({"pattern": "unstructured", "sparsity": 0.8}, 0.8),
        ({"pattern": "block", "block_size": 4, "sparsity": 0.75, "include": "lstm"}, 0.75),
        ({"pattern": "vector", "vector_size": 4, "sparsity": 0.5, "exclude": "conv"}, 0.5),
    ],
)
def test_other_patterns_reach_target(tiny_zoo, kwargs, target):
    pruner = BalancedPruningCallback(
        schedule="linear", frequency=2, end_step=8, verbose=False, **kwargs
    )
    fit(tiny_zoo, pruner, epochs=2)
    for layer in pruner.layers.values():
        param = layer.entry.param.detach()
        assert layer.effective == pytest.approx(target, abs=0.02), layer.entry.name
        assert float((param == 0).float().mean()) == pytest.approx(layer.effective)
    if kwargs["pattern"] == "nm":
        head = pruner.plan.modules()["head"]
        assert {p: e.compact_layout for p, e in head.items()} == {"weight": (4, 2)}
        for layer in pruner.layers.values():
            assert_balanced(layer.entry.module, layer.entry.param_name, 4, 2)


def test_one_shot_prunes_once_at_start_step(tiny_zoo, memory_logger):
    pruner = BalancedPruningCallback(
        sparsity=0.5, bank_size=8, schedule="one_shot", start_step=3, verbose=False
    )
    fit(tiny_zoo, pruner, logger=memory_logger, epochs=1)
    steps = [step for step, metrics in memory_logger.records if "sparsity/overall" in metrics]
    assert steps == [3]


def test_gradient_accumulation_prunes_once_per_optimizer_step(tiny_zoo, memory_logger):
    pruner = BalancedPruningCallback(
        sparsity=0.75, bank_size=8, schedule="linear", frequency=1, end_step=3, verbose=False
    )
    trainer, _ = fit(tiny_zoo, pruner, logger=memory_logger, epochs=2, accumulate_grad_batches=2)
    assert trainer.global_step == 8
    steps = [step for step, metrics in memory_logger.records if "sparsity/overall" in metrics]
    # linear 0 -> 0.75 over 3 steps: k = 8, 6, 4, 2 at steps 0..3, each pruned once
    assert steps == [1, 2, 3]


def test_per_layer_targets(tiny_zoo):
    pruner = BalancedPruningCallback(
        sparsity={"lstm": 0.875, "encoder.linear*": 0.75, "head": 0.5},
        bank_size=8,
        frequency=2,
        end_step=6,
        verbose=False,
    )
    fit(tiny_zoo, pruner, epochs=1)
    keeps = {name: layer.keep for name, layer in pruner.layers.items()}
    assert keeps == {
        **{n: 1 for n in EXPECTED_LAYERS if n.startswith("lstm")},
        "encoder.linear1.weight": 2,
        "encoder.linear2.weight": 2,
        "head.weight": 4,
    }
    assert (tiny_zoo.conv.weight != 0).all()  # matched by no key: dense


def test_default_end_step_is_three_quarters_of_training(tiny_zoo):
    pruner = BalancedPruningCallback(sparsity=0.5, bank_size=8, frequency=10, verbose=False)
    fit(tiny_zoo, pruner, epochs=5)
    assert pruner._resolved_end == 30
    assert all(layer.keep == 4 for layer in pruner.layers.values())


def test_initial_sparsity_applies_at_start_step(tiny_zoo, memory_logger):
    pruner = BalancedPruningCallback(
        sparsity=0.75,
        bank_size=8,
        schedule="linear",
        start_step=2,
        end_step=6,
        frequency=2,
        initial_sparsity=0.5,
        verbose=False,
    )
    fit(tiny_zoo, pruner, logger=memory_logger, epochs=1)
    logged = {
        step: m["sparsity/head.weight"]
        for step, m in memory_logger.records
        if "sparsity/overall" in m
    }
    # linear 0.5 -> 0.75 over steps 2..6: k = 4 at step 2, 3 at step 4 (0.625), 2 at step 6
    assert logged == {2: 0.5, 4: 0.625, 6: 0.75}
