"""lowrank: parameter-efficient fine-tuning (LoRA, VeRA, QLoRA) as drop-in nn.Modules backed by
hand-written C++ (CPU) and CUDA kernels.

    import lowrank
    layer = lowrank.LoRALinear(4096, 4096, r=16, alpha=32)       # or LoRALinear.from_linear(linear)
    qlayer = lowrank.QLoRALinear.from_linear(linear, r=16)       # NF4 base + LoRA (QLoRA)
    vlayer = lowrank.VeRALinear(4096, 4096, r=256)               # or VeRALinear.from_linear(linear)
    lowrank.inject(model, lowrank.LoRAConfig(r=16))              # adapters into a whole model (lowrank.adapters)
    lowrank.fast_loss(model)                                     # a causal LM's loss on lowrank's kernels
    lowrank.recompute_pointwise(model)                           # less activation memory, the same gradients
    lowrank.fast_decoder(model)                                  # a decoder's attention, RMSNorms and MLP products
                                                                 # on lowrank's kernels (fast_attention, fast_norm,
                                                                 # fast_swiglu: each alone too)
    lowrank.info()                                               # what was built, what runs here
"""

import torch  # noqa: F401  (first: _C's libgomp.so.1 must bind to the OpenMP runtime torch loaded)

from . import _C
from ._info import info
from .autograd import LoRALinearFunction, NF4LinearFunction, VeRALinearFunction
from .attention import CausalAttentionFunction, causal_attention, fast_attention
from .norm import RMSNormFunction, fast_norm, rms_norm
from .swiglu import SiLUMulFunction, fast_swiglu, silu_mul
from .decoder import fast_decoder, fast_decoder_report
from .loss import CrossEntropyFunction, causal_lm_loss, cross_entropy, fast_loss, linear_cross_entropy
from .recompute import PointwiseRecompute, recompute_pointwise, recomputes_pointwise
from .layers import FrozenLinear, LoRALinear, NF4Linear, QLoRALinear, VeRALinear, quantize_nf4, vera_shared_projections
from .adapters import *  # noqa: F401,F403  (the model-level API: inject, set_adapter, save_adapter, ...)
from .adapters import __all__ as _adapters_all

__version__ = _C.build_info()["version"]

__all__ = [
    "FrozenLinear",
    "LoRALinear",
    "LoRALinearFunction",
    "NF4Linear",
    "NF4LinearFunction",
    "QLoRALinear",
    "quantize_nf4",
    "VeRALinear",
    "VeRALinearFunction",
    "vera_shared_projections",
    "CrossEntropyFunction",
    "cross_entropy",
    "linear_cross_entropy",
    "causal_lm_loss",
    "fast_loss",
    "CausalAttentionFunction",
    "causal_attention",
    "fast_attention",
    "RMSNormFunction",
    "rms_norm",
    "fast_norm",
    "SiLUMulFunction",
    "silu_mul",
    "fast_swiglu",
    "fast_decoder",
    "fast_decoder_report",
    "PointwiseRecompute",
    "recompute_pointwise",
    "recomputes_pointwise",
    "info",
    "__version__",
    *_adapters_all,
]
