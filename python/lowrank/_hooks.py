"""Forward hooks that lowrank installs on a user's model, found and removed by identity (so they
survive ``copy.deepcopy`` of the model, which copies the hook dicts with the same functions)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def has_forward_pre_hook(module: nn.Module, hook: Callable) -> bool:
    return any(h is hook for h in module._forward_pre_hooks.values())


def remove_forward_hooks(module: nn.Module, pre_hook: Callable, hook: Callable) -> None:
    """Remove every registration of ``pre_hook`` (a forward pre-hook) and ``hook`` (a forward hook) from
    ``module``, with their kwargs and always-call entries (what ``RemovableHandle.remove`` clears)."""
    for hooks, extras, ours in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,), pre_hook),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called), hook),
    ):
        for key in [k for k, h in hooks.items() if h is ours]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)
