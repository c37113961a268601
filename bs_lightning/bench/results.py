"""Result files: every benchmark writes its record as `<stem>.json` beside a `<stem>.md` report."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_result"]


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
