"""Benchmarks: scripts that time the real code paths and write JSON/Markdown (never tests)."""
