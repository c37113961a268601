"""Result files: every benchmark writes its record as `<stem>.json` beside a `<stem>.md` report."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import torch

from bs_lightning.bench.device import load_average, machine_description

__all__ = ["cpu_record", "write_result"]


def cpu_record(benchmark: str, source: str) -> dict:
    """The header of a CPU benchmark's record: what ran, on what, when, and the load."""
    return {
        "benchmark": benchmark,
        "source": source,
        "date": dt.date.today().isoformat(),
        "machine": machine_description("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def write_result(stem: Path, record: dict, markdown: str) -> tuple[Path, Path]:
    """Write `<stem>.json` (`record`, indented) and `<stem>.md`, creating the folder.

    Returns:
        The two paths written.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
