"""Every recipe composes and runs end to end (tiny); config mistakes give clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
)
from omegaconf import OmegaConf
from recipe_overrides import PER_RECIPE, TESTED_ELSEWHERE, tiny

from bs_lightning.config_paths import compose_config, config_dirs, register_recipes
from bs_lightning.train import train

_, RECIPES_DIR = config_dirs()
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_kernel_build(monkeypatch):
    # compiling the kernels takes minutes on a busy CPU: use a cached library when there is
    # one, else the reference path (conversion and its metrics do not depend on which)
    monkeypatch.setenv("BS_LIGHTNING_NO_BUILD", "1")


def _compose(overrides: list[str]):
    # registers the recipes first: importing bs_lightning.train does not
    return compose_config(overrides)


def test_every_recipe_is_registered_and_has_tiny_overrides():
    assert register_recipes() == RECIPES
    assert set(RECIPES) >= {
        "quickstart",
        "lstm_ptb",
        "lstm_ptb_small",
        "cnn_fashion_mnist",
        "transformer_ptb",
    }
    # a new recipe needs tiny overrides here (run by test_recipe_runs_end_to_end) or its own
    # tiny run in the test file TESTED_ELSEWHERE names
    missing = sorted(set(RECIPES) - set(PER_RECIPE) - set(TESTED_ELSEWHERE))
    assert not missing, f"add tiny overrides for {missing} to tests/recipe_overrides.py"
    for recipe, test_file in TESTED_ELSEWHERE.items():
        assert f"recipe={recipe}" in (Path(__file__).parent / test_file).read_text()


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_only_overrides(recipe):
    text = (RECIPES_DIR / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    base = _compose(["output_dir=/tmp/unused"])
    cfg = _compose([f"recipe={recipe}", "output_dir=/tmp/unused"])
    assert cfg.run_name == recipe
    # every value the recipe sets is a key the base config (with the recipe's group
    # choices) already has: recipes override, they never add
    body = yaml.safe_load(text)
    for group in ("model", "data", "pruning", "trainer", "logger", "evaluate"):
        assert set(body.get(group, {})) <= set(cfg[group]), group
    assert set(body) - {"defaults"} <= set(base) | {"hydra"}
    for key, value in body.get("pruning", {}).items():
        assert OmegaConf.to_container(cfg.pruning)[key] == value


@pytest.mark.parametrize("recipe", sorted(PER_RECIPE))
def test_recipe_runs_end_to_end(recipe, tmp_path):
    cfg = _compose(tiny(recipe, tmp_path))
    metrics = train(cfg)
    run = tmp_path / "run"
    for name in ("metrics.json", "report.md", "accuracy_vs_speedup.png", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert (run / "logs" / "metrics.csv").is_file()
    target = cfg.pruning.sparsity
    # balanced keep-counts round per bank: the effective sparsity is within one weight per bank
    assert abs(metrics["effective_sparsity"] - target) <= 1.0 / cfg.pruning.bank_size
    assert metrics["converted"] == pytest.approx(metrics["pruned"], rel=1e-4)
    lat = metrics["latency"]
    assert lat["dense_ms"] > 0 and lat["converted_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["dense_ms"] / lat["converted_ms"])
    assert metrics["metric_name"] in ("test/acc", "test/ppl")


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(MissingConfigException, match=r"recipe/nope(.|\n)*quickstart"):
        _compose(["recipe=nope"])


def test_wrong_key_is_named():
    with pytest.raises(ConfigCompositionException, match="hiden_size"):
        _compose(["recipe=lstm_ptb_small", "model.hiden_size=3"])


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("pruning.pattern=diagonal", ValueError, "diagonal"),
        ("pruning.sparsity=1.5", ValueError, "sparsity"),
        # Hydra wraps errors of the classes it instantiates, naming the config key
        ("model.optimizer=adam", InstantiationException, r"unknown optimizer 'adam'(.|\n)*model"),
        ("data.test_fraction=0", InstantiationException, r"test_fraction(.|\n)*full_key: data"),
    ],
)
def test_bad_values_raise_before_training(override, error, match, tmp_path):
    cfg = _compose(tiny("quickstart", tmp_path, override))
    with pytest.raises(error, match=match):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_cli_reports_an_unknown_recipe_clearly():
    result = subprocess.run(
        [sys.executable, "-m", "bs_lightning.train", "recipe=nope"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "Could not find 'recipe/nope'" in result.stderr
    assert "Available options in 'recipe'" in result.stderr and "quickstart" in result.stderr
