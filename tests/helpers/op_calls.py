"""`OpCalls`: counts the calls of one operator while active (a dispatch mode sees custom ops
such as `bs_lightning::balanced_lstm_cell` as well as aten ones)."""

from torch.utils._python_dispatch import TorchDispatchMode


class OpCalls(TorchDispatchMode):
    """`with OpCalls("bs_lightning::balanced_lstm_cell") as calls: ...`, then `calls.count`."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.count = name, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.name() == self.name
        return func(*args, **(kwargs or {}))
