"""Capture a module's forward (e.g. `BalancedSparseLSTM`'s step loop) in a CUDA graph.

At batch 1 a sparse layer's kernels take a few microseconds each, about as long as launching
them from Python; a recurrent model launches several per time step. `CudaGraphRunner`
records the whole call once with static input buffers and replays it with one launch:

    runner = CudaGraphRunner(sparse_lstm, [x_example])   # warm-up + capture
    out, (h, c) = runner(x)                               # copy x in, replay, copy out

The callable must be capturable: no host syncs (`.item()`, printing tensors), no
data-dependent Python branches, allocations only through torch's caching allocator. The
graph replays the same kernels on the same shapes; new shapes need a new runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["CudaGraphRunner"]


class CudaGraphRunner:
    """Captures `fn(*static_inputs)` in a `torch.cuda.CUDAGraph`; each call replays it.

    Args:
        fn: the callable (e.g. a module in eval mode) to capture; its outputs must be
            tensors or (nested) tuples/lists/dicts of tensors.
        example_inputs: one CUDA tensor per positional argument of `fn`; their shapes,
            dtypes and device are fixed for the runner's lifetime. Copied into static
            buffers (the examples themselves are not kept).
        warmup: eager calls on a side stream before capture (lazy initialisation such as
            cuBLAS handles and kernel builds must not happen during capture).

    Raises:
        ValueError: when `example_inputs` is empty, holds a non-tensor or a tensor that is
            not on a CUDA device, or its tensors are on different devices; or `warmup < 1`.
    """

    def __init__(
        self, fn: Callable, example_inputs: Sequence[torch.Tensor], warmup: int = 2
    ) -> None:
        if not example_inputs:
            raise ValueError("CudaGraphRunner needs at least one example input tensor")
        for i, t in enumerate(example_inputs):
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
                where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"CudaGraphRunner: example_inputs[{i}] must be a CUDA tensor, got {where}"
                )
        devices = {t.device for t in example_inputs}
        if len(devices) > 1:
            raise ValueError(
                f"CudaGraphRunner: example inputs must share one CUDA device, got {sorted(map(str, devices))}"
            )
        if warmup < 1:
            raise ValueError(f"CudaGraphRunner: warmup must be >= 1, got {warmup}")
        self.fn = fn
        self.device = example_inputs[0].device
        self.static_inputs = [t.detach().clone() for t in example_inputs]
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph):
                self.static_outputs = fn(*self.static_inputs)
        leaves, _ = tree_flatten(self.static_outputs)
        if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise ValueError("CudaGraphRunner: fn must return tensors or containers of tensors")

    def replay(self):
        """Replays the graph on the current static inputs; returns the static outputs
        (overwritten by the next replay)."""
        self.graph.replay()
        return self.static_outputs

    def __call__(self, *inputs: torch.Tensor, clone: bool = True):
        """Copies `inputs` into the static buffers, replays, returns the outputs.

        Args:
            *inputs: tensors shaped like the example inputs (dtype and device are converted
                by the copy).
            clone: return copies (default) rather than the static output buffers, which the
                next call overwrites.

        Raises:
            ValueError: when the number or shapes of `inputs` differ from the examples.
        """
        if len(inputs) != len(self.static_inputs):
            raise ValueError(
                f"CudaGraphRunner: expected {len(self.static_inputs)} inputs, got {len(inputs)}"
            )
        for i, (static, new) in enumerate(zip(self.static_inputs, inputs, strict=True)):
            if new.shape != static.shape:
                raise ValueError(
                    f"CudaGraphRunner: input {i} has shape {tuple(new.shape)}, the graph was "
                    f"captured for {tuple(static.shape)}; capture a new runner for new shapes"
                )
            static.copy_(new)
        out = self.replay()
        return tree_map(torch.Tensor.clone, out) if clone else out
