"""The output head lowrank leaves an ``nn.Linear``, frozen: :class:`FrozenLinear`."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.lora import frozen_linear


class FrozenLinear(nn.Linear):
    """An output head that lowrank froze and left a plain ``nn.Linear`` (``inject`` makes it one by
    changing its class, as ``torch.nn.utils.parametrize`` does; ``merge_and_unload`` changes it back):
    the same parameters, state dict and ``isinstance``; its forward is ``ops/lora.py``'s
    ``frozen_linear``: rows for torch's GEMM (``fold_rows``), and for a few tokens without gradients
    (decoding) the row kernel, which streams the weight once. A Zen 4 ran SmolLM2's bf16 head
    (576 → 49152) in 3.6 ms a token against ``F.linear``'s 5.6, and GPT-2's fp32 one (768 → 50257) at
    8 tokens in 8.6 against 26."""

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.weight, self.bias)


# The forwards that compute a plain ``F.linear(x, weight, bias)``.
LINEAR_FORWARDS = (nn.Linear.forward, FrozenLinear.forward)
