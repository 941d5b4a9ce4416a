"""Drop-in ``nn.Module``s, one file per method."""

from .frozen import FrozenLinear
from .lora import LoRALinear
from .nf4 import NF4Linear, QLoRALinear, quantize_nf4
from .vera import VeRALinear, vera_shared_projections

__all__ = ["FrozenLinear", "LoRALinear", "NF4Linear", "QLoRALinear", "quantize_nf4", "VeRALinear", "vera_shared_projections"]
