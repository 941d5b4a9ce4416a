"""The op registry: every lowrank op is a ``torch.library`` custom op (``torch.ops.lowrank.*``) with
a schema, a fake kernel, CPU and CUDA kernels and a pure-PyTorch reference kernel (``*_reference``).

LoRA (lowrank/ops/lora.py): lora_linear_forward, lora_linear_backward_adapter,
lora_linear_backward_input.

NF4 / QLoRA (lowrank/ops/nf4.py): nf4_quantize, nf4_double_quant, nf4_dequantize, nf4_linear_forward,
nf4_linear_backward_input.

VeRA (lowrank/ops/vera.py): vera_linear_forward, vera_linear_backward_adapter (its input gradient is
lora_linear_backward_input).

Mixed-adapter batches (lowrank/ops/mixed.py): mixed_linear_forward (a different adapter per row).

The language-model loss (lowrank/ops/loss.py): cross_entropy_forward, cross_entropy_backward.
"""

from . import lora, loss, mixed, nf4, vera
from .lora import (
    lora_linear_backward_adapter,
    lora_linear_backward_adapter_reference,
    lora_linear_backward_input,
    lora_linear_backward_input_reference,
    lora_linear_forward,
    lora_linear_forward_reference,
)
from .mixed import mixed_linear_forward, mixed_linear_forward_reference, plan_rows
from .vera import (
    vera_linear_backward_adapter,
    vera_linear_backward_adapter_reference,
    vera_linear_forward,
    vera_linear_forward_reference,
)

__all__ = [
    "lora",
    "loss",
    "mixed",
    "nf4",
    "vera",
    "lora_linear_forward",
    "lora_linear_forward_reference",
    "lora_linear_backward_adapter",
    "lora_linear_backward_adapter_reference",
    "lora_linear_backward_input",
    "lora_linear_backward_input_reference",
    "vera_linear_forward",
    "vera_linear_forward_reference",
    "vera_linear_backward_adapter",
    "vera_linear_backward_adapter_reference",
    "mixed_linear_forward",
    "mixed_linear_forward_reference",
    "plan_rows",
]
