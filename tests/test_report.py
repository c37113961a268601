"""bs-report: aggregation of runs into one table and plot; one run's report files."""

import json
import subprocess
import sys

import pytest
from recipe_overrides import COMMON

from bs_lightning.report import load_runs, main, render_markdown, summarize, write_run_report


@pytest.fixture(autouse=True)
def _no_kernel_build(monkeypatch):
    # compiling the kernels takes minutes on a busy CPU: use a cached library when there is
    # one, else the reference path (conversion and its metrics do not depend on which)
    monkeypatch.setenv("BS_LIGHTNING_NO_BUILD", "1")


def _run(pattern: str, sparsity: float, metric: float, speedup=None, dense=None) -> dict:
    converted = metric if speedup is not None else None
    return {
        "run_name": "t",
        "model": "M",
        "data": "D",
        "pattern": pattern,
        "sparsity": sparsity,
        "bank_size": 32,
        "block_size": 4,
        "metric_name": "test/ppl",
        "higher_is_better": False,
        "dense": dense,
        "pruned": metric,
        "effective_sparsity": sparsity,
        "converted": converted,
        "conversion": "x",
        "latency": {
            "device": "cpu",
            "input_shape": [1, 35],
            "dense_ms": 2.0,
            "converted_ms": None if speedup is None else 2.0 / speedup,
            "speedup": speedup,
        },
        "fit_time_s": 1.0,
        "wall_time_s": 2.0,
    }


def test_every_converting_pattern_gets_a_speedup_column():
    nm = _run("nm", 0.5, 105.0, speedup=1.4, dense=99.0)
    nm["pattern_options"] = {"pattern": "nm", "n": 2, "m": 4}  # as bs-train writes it
    summary = summarize([_run("balanced", 0.5, 104.0, speedup=1.5, dense=99.0), nm])
    assert summary["patterns"] == ["balanced", "nm 2:4"]
    assert summary["converting"] == ["balanced", "nm 2:4"]
    md = render_markdown(summary, "T")
    assert "| sparsity | dense | balanced | nm 2:4 | balanced speedup | nm 2:4 speedup |" in md
    assert "| 0.5 |  | 104.00 | 105.00 | 1.50x | 1.40x |" in md


def test_summarize_builds_the_paper_table():
    runs = [
        _run("balanced", 0.0, 100.0),
        _run("balanced", 0.8, 110.0, speedup=3.0, dense=99.0),
        _run("balanced", 0.8, 112.0, speedup=2.0, dense=99.0),  # a second seed: averaged
        _run("unstructured", 0.8, 109.0, dense=99.0),
        _run("block", 0.8, 130.0, dense=99.0),
        _run("block", 0.9, 150.0, dense=99.0),
    ]
    summary = summarize(runs)
    assert summary["dense"] == 100.0  # from the dense run, not the baselines
    assert summary["patterns"] == ["balanced", "block 4x4", "unstructured"]
    assert summary["sparsities"] == [0.8, 0.9]
    bal = summary["cells"]["balanced@0.8"]
    assert bal["metric"] == 111.0 and bal["speedup"] == 2.5 and bal["runs"] == 2
    assert summary["cells"]["unstructured@0.8"]["speedup"] is None
    assert "balanced@0.9" not in summary["cells"]
    md = render_markdown(summary, "T")
    assert "| 0 | 100.00 |  |  |  | |" in md
    assert "| 0.8 |  | 111.00 | 130.00 | 109.00 | 2.50x |" in md
    assert "| 0.9 |  |  | 150.00 |  | - |" in md


def test_summarize_gives_each_bank_size_its_own_column():
    runs = []
    for bank, ppl in ((25, 120.0), (50, 121.0), (100, 124.0)):
        run = _run("balanced", 0.8, ppl, speedup=1.5, dense=99.0)
        run["bank_size"] = bank
        runs.append(run)
    summary = summarize(runs + [_run("unstructured", 0.8, 119.0, dense=99.0)])
    banks = ["balanced (banks of 25)", "balanced (banks of 50)", "balanced (banks of 100)"]
    assert summary["patterns"] == banks + ["unstructured"]
    assert summary["converting"] == banks
    assert summary["cells"]["balanced (banks of 25)@0.8"]["metric"] == 120.0
    assert all(c["runs"] == 1 for c in summary["cells"].values())


def test_summarize_takes_dense_from_baselines_without_a_dense_run():
    summary = summarize([_run("balanced", 0.6, 101.0, speedup=1.5, dense=98.0)])
    assert summary["dense"] == 98.0


def test_summarize_rejects_mixed_metrics():
    other = _run("balanced", 0.6, 0.9)
    other["metric_name"] = "test/acc"
    with pytest.raises(ValueError, match=r"different metrics \['test/acc', 'test/ppl'\]"):
        summarize([_run("balanced", 0.6, 101.0), other])


def test_load_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no metrics.json under"):
        load_runs(tmp_path)
    assert main([str(tmp_path)]) == 2


def test_write_run_report_files(tmp_path):
    write_run_report(tmp_path / "r", _run("balanced", 0.8, 110.0, speedup=3.0, dense=99.0))
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["pruned"] == 110.0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| converted, sparse kernels | 110.0000 | 0.667 | 3.00 |" in md
    assert (tmp_path / "r" / "accuracy_vs_speedup.png").stat().st_size > 1000


def test_bs_train_multirun_then_bs_report(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in COMMON if not o.startswith("output_dir")]
    cmd = [
        sys.executable,
        "-m",
        "bs_lightning.train",
        "-m",
        "recipe=quickstart",
        "model.hidden_sizes=[64,64]",
        "pruning.pattern=balanced,unstructured",
        "pruning.sparsity=0.5",
        *overrides,
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in sweep.rglob("metrics.json"))
    assert runs == ["0_balanced_0.5", "1_unstructured_0.5"]
    assert main([str(sweep), "--title", "tiny"]) == 0
    summary = json.loads((sweep / "report.json").read_text())
    assert summary["metric_name"] == "test/acc" and summary["sparsities"] == [0.5]
    assert summary["cells"]["balanced@0.5"]["speedup"] > 0
    assert summary["cells"]["unstructured@0.5"]["speedup"] is None
    assert "| 0.5 |" in (sweep / "report.md").read_text()
    assert (sweep / "accuracy_vs_speedup.png").stat().st_size > 1000
