"""The Hydra contract: `pruning` builds its callback through `_target_`, the `paths` group
follows environment variables, and importing the entry modules has no side effects."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bs_lightning import BalancedPruningCallback
from bs_lightning.config_paths import compose_config, config_dirs
from bs_lightning.train import build_pruning_callback

CONF_DIR, RECIPES_DIR = config_dirs()
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
PATH_VARS = ("BS_LIGHTNING_ROOT_DIR", "BS_LIGHTNING_DATA_DIR", "BS_LIGHTNING_OUTPUT_DIR")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # the defaults below are the ones a user without these variables gets
    for name in (*PATH_VARS, "BS_PTB_ROOT", "BS_SST2_ROOT"):
        monkeypatch.delenv(name, raising=False)


def _run(code: str) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter (nothing imported yet)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------- pruning: _target_


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_pruning_instantiates_the_callback_with_its_values(recipe):
    cfg = compose_config([f"recipe={recipe}"])
    assert cfg.pruning._target_ == "bs_lightning.BalancedPruningCallback"
    # every other key is a keyword argument of the callback, with the recipe's value
    partial = instantiate(cfg.pruning, _partial_=True, _convert_="all")
    assert isinstance(partial, functools.partial) and partial.func is BalancedPruningCallback
    values = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())["pruning"]
    kwargs = partial.keywords
    assert {key: kwargs[key] for key in values} == values
    callback = build_pruning_callback(cfg.pruning)
    assert type(callback) is BalancedPruningCallback
    assert callback.targets == {"*": values["sparsity"]}
    assert (callback.schedule, callback.start_step, callback.end_step, callback.frequency) == (
        kwargs["schedule"],
        kwargs["start_step"],
        kwargs["end_step"],
        kwargs["frequency"],
    )
    # one glob or a list of them in the yaml: a plain list in the callback
    for key in ("include", "exclude"):
        want = kwargs[key]
        assert getattr(callback, key) == ([want] if isinstance(want, str) else want)


def test_pruning_option_values_reach_the_callback():
    cfg = compose_config(
        [
            "pruning.pattern=unstructured",
            "pruning.sparsity=0.6",
            "pruning.schedule=linear",
            "pruning.include=[net.1,net.4]",
            "+pruning.initial_sparsity=0.1",
        ]
    )
    callback = build_pruning_callback(cfg.pruning)
    assert callback.targets == {"*": 0.6} and callback.schedule == "linear"
    assert callback.include == ["net.1", "net.4"] and type(callback.include) is list
    assert callback.initial_sparsity == 0.1


def test_per_layer_targets_arrive_as_a_plain_dict():
    cfg = compose_config(["pruning.sparsity={net:0.5,head:0.75}", "pruning.bank_size=4"])
    callback = build_pruning_callback(cfg.pruning)
    assert callback.targets == {"net": 0.5, "head": 0.75}


@pytest.mark.parametrize(
    "overrides",
    [
        ["pruning=none"],
        ["recipe=quickstart", "pruning.sparsity=0"],
        ["recipe=lstm_ptb_small", "pruning.sparsity=0.0"],
        ["pruning.sparsity={net:0,head:0.0}"],  # a mapping of zeros is dense too
    ],
)
def test_dense_config_builds_no_callback(overrides):
    cfg = compose_config(overrides)
    assert cfg.pruning._target_ == "bs_lightning.BalancedPruningCallback"  # never built
    assert build_pruning_callback(cfg.pruning) is None


def test_plain_dict_config_works_too():
    pruning = OmegaConf.to_container(compose_config([]).pruning)
    assert type(build_pruning_callback(pruning)) is BalancedPruningCallback
    assert build_pruning_callback({**pruning, "sparsity": 0}) is None


def test_callback_value_errors_name_the_parameter():
    cfg = compose_config(["pruning.schedule=exponential"])
    with pytest.raises(ValueError, match=r"^pruning: .*schedule(.|\n)*cubic"):
        build_pruning_callback(cfg.pruning)


def test_unknown_target_is_hydras_error():
    cfg = compose_config(["pruning._target_=bs_lightning.NoSuchCallback"])
    with pytest.raises(InstantiationException, match="NoSuchCallback"):
        build_pruning_callback(cfg.pruning)


# ------------------------------------------------------------------------------ paths


def test_paths_defaults_keep_the_old_locations():
    cfg = compose_config(["recipe=lstm_ptb_small"], return_hydra_config=True)
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    assert Path(paths["root_dir"]) == Path(".")
    # the recipes read ../shared/data/NAME as before the paths group
    assert Path(cfg.data.root).resolve() == Path("../shared/data/ptb").resolve()
    assert Path(cfg.hydra.run.dir).parent == Path("outputs/lstm_ptb_small")
    assert Path(cfg.hydra.sweep.dir).parent == Path("multirun/lstm_ptb_small")


def test_paths_follow_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("BS_LIGHTNING_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BS_LIGHTNING_OUTPUT_DIR", str(tmp_path / "out"))
    cfg = compose_config(["recipe=lstm_ptb_small"], return_hydra_config=True)
    assert cfg.paths.data_dir == str(tmp_path / "data")
    assert cfg.data.root == str(tmp_path / "data" / "ptb")
    assert Path(cfg.hydra.run.dir).parent == tmp_path / "out" / "outputs" / "lstm_ptb_small"
    assert Path(cfg.hydra.sweep.dir).parent == tmp_path / "out" / "multirun" / "lstm_ptb_small"
    # the recipe's own variable still comes first
    monkeypatch.setenv("BS_SST2_ROOT", str(tmp_path / "mine"))
    assert compose_config(["recipe=minilm_sst2"]).data.root == str(tmp_path / "mine")


def test_root_dir_moves_the_relative_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("BS_LIGHTNING_ROOT_DIR", str(tmp_path))
    paths = compose_config([]).paths
    assert Path(paths.data_dir) == tmp_path / ".." / "shared" / "data"
    assert Path(paths.runs_dir) == tmp_path / "outputs"
    assert Path(paths.multiruns_dir) == tmp_path / "multirun"


def test_data_root_can_point_at_the_data_dir(monkeypatch, tmp_path):
    # what the comments of conf/data/ptb.yaml and sst2.yaml suggest
    monkeypatch.setenv("BS_LIGHTNING_DATA_DIR", str(tmp_path))
    assert compose_config(["data=ptb"]).data.root is None  # the hub, as before
    cfg = compose_config(["data=ptb", "data.root=${paths.data_dir}/ptb"])
    assert cfg.data.root == f"{tmp_path}/ptb"


def test_cli_output_folder_follows_the_environment(tmp_path):
    # bs-train itself: main() registers the recipes, and hydra.run.dir uses the output root
    env = {k: v for k, v in os.environ.items() if k not in PATH_VARS}
    cmd = [sys.executable, "-m", "bs_lightning.train", "recipe=quickstart"]
    result = subprocess.run(
        [*cmd, "--cfg", "all", "--resolve"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "BS_LIGHTNING_OUTPUT_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hydra_cfg = yaml.safe_load(result.stdout)["hydra"]
    assert Path(hydra_cfg["run"]["dir"]).parent == tmp_path / "outputs" / "quickstart"
    assert Path(hydra_cfg["sweep"]["dir"]).parent == tmp_path / "multirun" / "quickstart"


# --------------------------------------------------------------- imports: no side effects


def test_importing_train_registers_nothing():
    result = _run(
        "import bs_lightning.train\n"
        "from hydra.core.config_store import ConfigStore\n"
        "assert 'recipe' not in ConfigStore.instance().repo, 'recipes registered at import'\n"
        "from bs_lightning.config_paths import register_recipes\n"
        "register_recipes()\n"
        "assert 'quickstart.yaml' in ConfigStore.instance().repo['recipe']\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_report_leaves_matplotlib_alone(tmp_path):
    # the backend as matplotlib keeps it (reading matplotlib.get_backend() would itself
    # resolve the default backend through pyplot)
    code = f"""
import sys
import matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")
import bs_lightning.report as report
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert dict.__getitem__(matplotlib.rcParams, "backend") is backend, "backend changed"
run = {{
    "run_name": "t", "model": "M", "data": "D", "pattern": "balanced", "sparsity": 0.5,
    "bank_size": 4, "block_size": 4, "metric_name": "test/acc", "higher_is_better": True,
    "dense": 0.9, "pruned": 0.8, "effective_sparsity": 0.5, "converted": 0.8,
    "conversion": "x", "fit_time_s": 1.0, "wall_time_s": 2.0,
    "latency": {{"device": "cpu", "input_shape": [1, 4], "dense_ms": 2.0,
                "converted_ms": 1.0, "speedup": 2.0}},
}}
report.write_run_report({str(tmp_path / "r")!r}, run)
report.write_summary({str(tmp_path)!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported by drawing"
assert dict.__getitem__(matplotlib.rcParams, "backend") is backend, "backend changed"
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    for png in (tmp_path / "r" / "accuracy_vs_speedup.png", tmp_path / "accuracy_vs_speedup.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
