"""`bs-bench` / `python -m bs_lightning.bench`: benchmark subcommands.

bs-bench kernels [options]   dense vs balanced op vs CSR, see bs_lightning.bench.kernels
bs-bench lstm [options]      LSTM inference end to end, see bs_lightning.bench.lstm_e2e
bs-bench model SOURCE ...    a whole model dense vs converted, see bs_lightning.bench.model
bs-bench finetune SOURCE ... fine-tuning step time and memory, see bs_lightning.bench.finetune
"""

from __future__ import annotations

import sys
from importlib import import_module

# subcommand -> module with main(argv)
COMMANDS = {
    "kernels": "bs_lightning.bench.kernels",
    "lstm": "bs_lightning.bench.lstm_e2e",
    "model": "bs_lightning.bench.model",
    "finetune": "bs_lightning.bench.finetune",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(sorted(COMMANDS))
        print(f"usage: bs-bench {{{names}}} [options]  (subcommand --help for options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return import_module(COMMANDS[argv[0]]).main(argv[1:])
