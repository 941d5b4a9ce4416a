"""Drop-in ``nn.Module``s, one file per method."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
