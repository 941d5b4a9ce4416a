"""lowrank: parameter-efficient fine-tuning (LoRA, VeRA, QLoRA) as drop-in nn.Modules backed by
hand-written C++ (CPU) and CUDA kernels.

    import lowrank
    layer = lowrank.LoRALinear(4096, 4096, r=16, alpha=32)       # or LoRALinear.from_linear(linear)
    layer = lowrank.VeRALinear(4096, 4096, r=256)                # or VeRALinear.from_linear(linear)
    lowrank.info()                                               # what was built, what runs here
"""

import torch  # noqa: F401  (first: _C's libgomp.so.1 must bind to the OpenMP runtime torch loaded)

from . import _C
from ._info import info
from .autograd import LoRALinearFunction, VeRALinearFunction
from .layers import LoRALinear, VeRALinear, vera_shared_projections

__version__ = _C.build_info()["version"]

__all__ = [
    "LoRALinear",
    "LoRALinearFunction",
    "VeRALinear",
    "VeRALinearFunction",
    "vera_shared_projections",
    "info",
    "__version__",
]
