"""Kernel benchmark plumbing: argument checks, byte counts, targets, report (no timing here)."""

from __future__ import annotations

import argparse

import pytest

from bs_lightning.bench import cli, kernels


def test_parse_shape():
    assert kernels.parse_shape("11008x4096") == (11008, 4096)
    with pytest.raises(argparse.ArgumentTypeError, match="OUTxIN like 4096x4096, got '4096'"):
        kernels.parse_shape("4096")


def test_default_grid_is_the_issue_grid():
    args = kernels.parse_args([])
    assert args.shapes == [(4096, 4096), (11008, 4096), (4096, 11008), (6000, 3000), (4096, 25088)]
    assert args.sparsities == [0.5, 0.75, 0.875, 0.9, 0.95]
    assert args.batches == [1, 8, 64, 256]
    assert args.bank_size == 32 and args.device == "cpu" and args.clock == "wall"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bank-size", "300"], "--bank-size must be in 1..256, got 300"),
        (["--sparsities", "0.99"], "keeps round"),
        (["--clock", "thread-cpu"], "use it with --threads 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        kernels.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bytes_moved_per_format():
    # 100 x 64 layer, batch 2, fp32: x and y are 2 * (64 + 100) * 4 bytes
    io = 2 * (64 + 100) * 4
    assert kernels.bytes_moved("dense", 100, 64, 2, 4, {}) == 100 * 64 * 4 + io
    # values (4 bytes) + one uint8 index per stored entry
    assert kernels.bytes_moved("balanced", 100, 64, 2, 4, {"nnz_slots": 800}) == 800 * 5 + io
    csr = {"nnz": 700, "csr_index_bytes": 8}
    assert kernels.bytes_moved("csr", 100, 64, 2, 4, csr) == 700 * 12 + 101 * 8 + io


def row(shape, sparsity_target, batch, speedup):
    return {
        "shape": shape,
        "sparsity_target": sparsity_target,
        "sparsity": 1 - 3 / 32,
        "batch": batch,
        "time_us": {"dense": 100.0 * speedup, "balanced": 100.0},
        "speedup_vs_dense": {"dense": 1.0, "balanced": speedup},
        "bytes_floor_fraction": {"dense": 0.5, "balanced": 0.25},
        "errors": {"csr": "RuntimeError: no CSR for this dtype"},
    }


def test_targets_and_markdown():
    import torch

    rows = [
        row("4096x4096", 0.9, 1, 6.5),
        row("11008x4096", 0.9, 1, 7.0),
        row("11008x4096", 0.5, 1, 9.0),  # not a target row (50%)
        row("6000x3000", 0.9, 1, 2.0),  # not a target shape
    ]
    targets = kernels.check_targets(rows, torch.device("cpu"), torch.float32, 32)
    assert [(t["shape"], t["batch"], t["met"]) for t in targets] == [
        ("4096x4096", 1, True),
        ("11008x4096", 1, False),
    ]
    assert kernels.check_targets(rows, torch.device("cpu"), torch.bfloat16, 32) == []
    result = {
        "meta": {
            "device_slug": "cpu-2core",
            "date": "2026-01-01T00:00:00+00:00",
            "machine": "test CPU",
            "threads": 2,
            "torch": "x",
            "dtype": "float32",
            "bank_size": 32,
            "backend": "compiled-cpu",
            "timing": "interleaved",
            "load_average": [1.0, 1.0],
            "copy_bandwidth_gbs": 10.0,
        },
        "rows": rows,
        "targets": targets,
    }
    md = kernels.to_markdown(result)
    assert "| 4096x4096 | 90.6% | 1 | - | 650.0 | 100.0 | - | - | 6.50x | - | 50% | 25% |" in md
    assert "- 11008x4096 batch 1: 7.00x (target 8x) MISSED" in md
    assert "- csr: RuntimeError: no CSR for this dtype" in md
    assert "- machine: test CPU, 2 intra-op threads\n" in md  # no ISA recorded
    result["meta"]["cpu_isa"] = "avx2"
    md = kernels.to_markdown(result)
    assert "- machine: test CPU, 2 intra-op threads, CPU kernels built for avx2\n" in md


def test_cli_dispatch(capsys):
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert "usage: bs-bench {finetune, kernels, lstm, model}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["kernels", "--help"])
    assert exc.value.code == 0
    assert "python -m bs_lightning.bench kernels" in capsys.readouterr().out


def test_cpu_contenders_rotate_weight_copies_past_the_cache():
    import argparse

    import torch

    args = argparse.Namespace(rotate_mb=1.0)
    w = torch.ones(64, 1024)  # 256 KiB: 4 copies make 1 MiB
    copies = kernels.copies_of(w, w.numel() * 4, args, torch.device("cpu"))
    assert len(copies) == 4 and copies[0] is w
    assert len({c.data_ptr() for c in copies}) == 4 and all(torch.equal(c, w) for c in copies)
    args.rotate_mb = 0  # one copy: the cache-hot figure
    assert kernels.copies_of(w, w.numel() * 4, args, torch.device("cpu")) == [w]
    seen = []
    rotation = kernels.Rotation(seen.append, ["a", "b", "c"])
    for _ in range(7):
        rotation()
    assert rotation.copies == 3 and seen == ["a", "b", "c", "a", "b", "c", "a"]


def test_interleaved_medians_times_blocks_of_calls():
    from bs_lightning.bench.timing import interleaved_medians

    counts = {"one": 0, "block": 0}

    def bump(name):
        counts[name] += 1

    interleaved_medians(
        {"one": lambda: bump("one"), "block": lambda: bump("block")},
        reps=3,
        warmup=1,
        calls={"block": 5},
    )
    assert counts == {"one": 4, "block": 20}  # (warmup + reps) x calls


def test_measure_latency_times_models_in_turns():
    import torch

    from bs_lightning.bench.timing import measure_latency

    order = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            assert torch.is_inference_mode_enabled() and not self.training
            order.append(self.name)
            return x

    ms = measure_latency(
        {"a": Probe("a"), "b": Probe("b")}, torch.ones(1), torch.device("cpu"), 2, 3
    )
    assert order == ["a", "b"] * 5  # warmup + repeats rounds, always in the same order
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


def test_measure_latency_warm_runs_each_model_once_untimed_before_its_timed_pass():
    import pytest
    import torch

    from bs_lightning.bench import timing

    order, clock_reads = [], []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            order.append(self.name)
            return x

    def synchronize_marks_the_clock(device):
        clock_reads.append(len(order))

    models = {"a": Probe("a"), "b": Probe("b")}
    real_sync, timing.sync = timing.sync, synchronize_marks_the_clock
    try:
        timing.measure_latency(models, torch.ones(1), torch.device("cpu"), 1, 2, cache="warm")
    finally:
        timing.sync = real_sync
    # warmup round, then per turn: an untimed pass, then the timed one of the same model
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2
    # the clock brackets only the second pass of each turn
    assert clock_reads == [3, 4, 5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match=r"cache must be one of \('cold', 'warm'\), got 'hot'"):
        timing.measure_latency(models, torch.ones(1), torch.device("cpu"), cache="hot")


def test_interleaved_medians_in_fixed_order_with_synchronize():
    from bs_lightning.bench.timing import interleaved_medians

    events = []
    fns = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    interleaved_medians(fns, reps=2, warmup=0, rotate=False, synchronize=lambda: events.append("|"))
    assert events == ["|", "a", "|", "|", "b", "|"] * 2
    events.clear()
    interleaved_medians(fns, reps=2, warmup=0)  # default: each round starts one later
    assert events == ["a", "b", "b", "a"]


def test_device_label_slug_and_result_files(tmp_path):
    import json
    import os

    import torch

    from bs_lightning.bench.device import (
        cpu_model_name,
        device_label,
        device_slug,
        machine_description,
    )
    from bs_lightning.bench.results import write_result

    assert device_label("cpu") == cpu_model_name() != ""
    assert device_slug(torch.device("cpu")) == f"cpu-{torch.get_num_threads()}core"
    assert machine_description("cpu").startswith(f"{os.cpu_count()}-core {cpu_model_name()}")
    written = write_result(tmp_path / "sub" / "cpu-2core-2026-01-01", {"rows": [1]}, "# md\n")
    assert [p.name for p in written] == ["cpu-2core-2026-01-01.json", "cpu-2core-2026-01-01.md"]
    assert (
        json.loads(written[0].read_text()) == {"rows": [1]} and written[1].read_text() == "# md\n"
    )
