"""Giving a transformers module a lowrank forward without changing its class: the modules whose class's
``forward`` has the very source of a reference class's (``LlamaRMSNorm``, ``LlamaMLP``: the models that copy
them), an instance ``forward`` that is a ``functools.partial`` of the fast one (so the model still pickles
and deep-copies, and keeps its classes and state-dict keys)."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

from torch import nn


class SourcePatch:
    """``fast`` (``fast(module, *args)``) as the forward of the modules whose class's forward is
    ``reference()``'s (a class; imported lazily: transformers is optional) and that ``eligible`` accepts."""

    def __init__(self, reference: Callable[[], type], fast: Callable, eligible: Callable[[nn.Module], bool]):
        self._reference = reference
        self._source: Optional[str] = None
        self._known: dict[type, bool] = {}  # module class -> whether its forward is the reference's
        self.fast = fast
        self.eligible = eligible

    def same_forward(self, module: nn.Module) -> bool:
        """Whether ``module``'s class's forward has the reference's source (False without transformers, or
        where no source can be read)."""
        cls = type(module)
        known = self._known.get(cls)
        if known is None:
            try:
                if self._source is None:
                    self._source = inspect.getsource(self._reference().forward)
                known = inspect.getsource(cls.forward) == self._source
            except (OSError, TypeError, ImportError):  # no source, or no transformers: not known
                known = False
            self._known[cls] = known
        return known

    def applies(self, module: nn.Module) -> bool:
        return self.same_forward(module) and self.eligible(module)

    def is_on(self, module: nn.Module) -> bool:
        f = module.__dict__.get("forward")
        return isinstance(f, functools.partial) and f.func is self.fast

    def apply(self, model: nn.Module, enabled: bool) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        for module in model.modules():
            if not enabled:
                if self.is_on(module):
                    del module.forward
            elif not self.is_on(module) and "forward" not in module.__dict__ and self.applies(module):
                module.forward = functools.partial(self.fast, module)
        return model

    def count(self, model: nn.Module) -> int:
        return sum(1 for m in model.modules() if self.is_on(m))
