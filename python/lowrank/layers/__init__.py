"""Drop-in ``nn.Module``s, one file per method."""

from .lora import LoRALinear
from .vera import VeRALinear, vera_shared_projections

__all__ = ["LoRALinear", "VeRALinear", "vera_shared_projections"]
