"""A recorder of the ATen/native ops a block of code dispatches, for tests that pin an op sequence or budget."""
from torch.utils._python_dispatch import TorchDispatchMode


class DispatchedOps(TorchDispatchMode):
    """``with DispatchedOps() as seen: ...`` leaves the schema names of the dispatched ops in ``seen.names``."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))
