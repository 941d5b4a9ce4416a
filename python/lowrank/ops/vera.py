"""VeRA ops: schema, reference, fake, CPU and CUDA kernels, all in one place.

    y = x Wᵀ + bias + b ⊙ ((d ⊙ (x_a A_sᵀ)) B_sᵀ)

    x: [..., K]   W: [N, K]   A_s = A[:r, :K]: [r, K]   B_s = B[:N, :r]: [N, r]   d: [r]   b: [N]

``A`` and ``B`` are the frozen random projections every adapted layer shares; a layer passes the
top-left slices it needs as views, and the kernels read them in place through their leading
dimensions (no copies). ``d`` and ``b`` are the trainable vectors. ``x_a`` is the adapter's input:
``x`` itself, or ``dropout(x)``. ``h = x_a A_sᵀ`` is accumulated and returned in fp32 (fp64 for fp64
inputs: grad_b sums products of h that cancel, and float64 gradcheck needs them exact); the backward
needs only it (and ``W``), never anything the size of ``y``. With ``weight=None`` the op computes
``bias + b ⊙ (u B_sᵀ)`` alone: the adapter term for a base layer with no dense weight (NF4), whose own
forward supplies ``x Wᵀ``.

Ops (``torch.ops.lowrank.*``):

- ``vera_linear_forward(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input) -> (y, h)``
- ``vera_linear_backward_adapter(grad_y, h, vera_b, lambda_d, lambda_b) -> (grad_d, grad_b, g)``, with
  ``g' = (grad_y ⊙ b) B_s``, ``grad_d = Σ_m h ⊙ g'``, ``grad_b = Σ_m grad_y ⊙ (u B_sᵀ)`` (``u = d ⊙ h``)
  and ``g = d ⊙ g'`` (fp32), the gradient reaching ``x_a A_sᵀ``;
- the input gradient ``grad_x = grad_y W + g A_s`` is ``lora_linear_backward_input`` (the same math, and
  the same kernels: W streamed once for few tokens).

The projections never get gradients.

Kernels: few tokens take ``h = x_a A_sᵀ``, then the fused row kernel with W streamed once and the
adapter term ``b ⊙ ((d ⊙ h) B_sᵀ)`` added in the same pass (d and b are the kernel's per-rank and
per-column scales: both diagonal scalings fused, h kept unscaled for the backward). On the CPU, over a
dense W without dropout, h comes from the row kernel too, in the same call (``lora_fused_cpu``, as
LoRA's); otherwise from ``down_projection`` (ops/lora.py). Many tokens take the best GEMM with the
adapter term ``u (b ⊙ B_s)ᵀ`` (the small ``(b ⊙ B_s)`` copy; bf16 on the CPU passes b to ``adapter_term`` as
its column scale instead) accumulated with it by ``addmm``, as LoRA's (ops/lora.py). dtypes: fp32/bf16 on CPU,
fp32/bf16/fp16 on CUDA; anything else (fp16 on CPU, fp64, other devices) runs the reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _C, _autocast
from .._autocast import off_in_backward
from .._validate import check_tensor, last_dim_contiguous, matrix, optional_matrix
from . import _direct, _gemm, _runtime
from . import lora as _lora

_FLOATS = _lora._FLOATS
_CPU_NATIVE = _lora._CPU_NATIVE
_CUDA_NATIVE = _lora._CUDA_NATIVE


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by every kernel, the fake one included, so bad input fails at trace time)
# ---------------------------------------------------------------------------------------------
def _h_dtype(dtype: torch.dtype) -> torch.dtype:
    """h's dtype for inputs of ``dtype``: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_vectors(lambda_d, lambda_b, r: int, n: int, dtypes, device) -> None:
    check_tensor("lambda_d", lambda_d, dtypes=dtypes, device=device, shape=(r,))
    check_tensor("lambda_b", lambda_b, dtypes=dtypes, device=device, shape=(n,))


def _check_forward(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input) -> None:
    check_tensor("x", x, dtypes=_FLOATS)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    k = x.shape[-1]
    if weight is not None:
        check_tensor("weight", weight, dtypes=(x.dtype,), device=x.device, ndim=2)
        if weight.shape[1] != k:
            raise ValueError(f"weight: expected [out, {k}] to match x's last dimension {k}, got {list(weight.shape)}")
    check_tensor("vera_a", vera_a, dtypes=(x.dtype, torch.float32), device=x.device, ndim=2)
    r = vera_a.shape[0]
    if vera_a.shape[1] != k:
        raise ValueError(f"vera_a: expected the slice A[:r, :{k}] ([r, {k}]), got {list(vera_a.shape)}")
    check_tensor("vera_b", vera_b, dtypes=(vera_a.dtype,), device=x.device, ndim=2)
    n = weight.shape[0] if weight is not None else vera_b.shape[0]
    if tuple(vera_b.shape) != (n, r):
        raise ValueError(f"vera_b: expected the slice B[:{n}, :{r}] ([{n}, {r}]), got {list(vera_b.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), device=x.device, shape=(n,))
    _check_vectors(lambda_d, lambda_b, r, n, (x.dtype, torch.float32), x.device)
    if adapter_input is not None:
        check_tensor("adapter_input", adapter_input, dtypes=(x.dtype,), device=x.device, shape=tuple(x.shape))


def _check_backward_adapter(grad_y, h, vera_b, lambda_d, lambda_b) -> None:
    check_tensor("vera_b", vera_b, dtypes=_FLOATS, ndim=2)
    n, r = vera_b.shape
    check_tensor("grad_y", grad_y, dtypes=_FLOATS, device=vera_b.device)
    if grad_y.dim() < 1 or grad_y.shape[-1] != n:
        raise ValueError(f"grad_y: expected [..., {n}] to match vera_b [{n}, {r}], got {list(grad_y.shape)}")
    check_tensor("h", h, dtypes=(_h_dtype(grad_y.dtype),), device=vera_b.device, shape=tuple(grad_y.shape[:-1]) + (r,))
    _check_vectors(lambda_d, lambda_b, r, n, _FLOATS, vera_b.device)


# ---------------------------------------------------------------------------------------------
# Reference kernels: the spec. fp32 accumulation (fp64 stays fp64), one rounding at the end.
# ---------------------------------------------------------------------------------------------
def vera_linear_forward_reference(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input):
    _check_forward(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)
    acc = _lora._acc(x.dtype)
    xa = x if adapter_input is None else adapter_input
    h = xa.to(acc) @ vera_a.to(acc).t()
    y = ((h * lambda_d.to(acc)) @ vera_b.to(acc).t()) * lambda_b.to(acc)
    if weight is not None:
        y = y + x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), h.to(_h_dtype(x.dtype))


def vera_linear_backward_adapter_reference(grad_y, h, vera_b, lambda_d, lambda_b):
    _check_backward_adapter(grad_y, h, vera_b, lambda_d, lambda_b)
    acc = _lora._acc(grad_y.dtype)
    (n, r), m = vera_b.shape, math.prod(grad_y.shape[:-1])
    dy, h2 = grad_y.reshape(m, n).to(acc), h.reshape(m, r).to(acc)
    d, b, b_s = lambda_d.to(acc), lambda_b.to(acc), vera_b.to(acc)
    g_prime = (dy * b) @ b_s
    grad_d = (h2 * g_prime).sum(0)
    grad_b = (dy * ((h2 * d) @ b_s.t())).sum(0)
    g = g_prime * d
    return grad_d.to(lambda_d.dtype), grad_b.to(lambda_b.dtype), g.to(h.dtype).reshape(h.shape)


# ---------------------------------------------------------------------------------------------
# Schemas. The decorated bodies are the default kernel (any device): the reference.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lowrank::vera_linear_forward", mutates_args=())
def vera_linear_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    vera_a: Tensor,
    vera_b: Tensor,
    lambda_d: Tensor,
    lambda_b: Tensor,
    adapter_input: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """``(y, h)``: ``y = x Wᵀ + bias + b ⊙ ((d ⊙ h) B_sᵀ)`` in x's dtype, ``h = x_a A_sᵀ`` in fp32 (fp64
    for fp64 x)."""
    return vera_linear_forward_reference(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)


@torch.library.custom_op("lowrank::vera_linear_backward_adapter", mutates_args=())
def vera_linear_backward_adapter(
    grad_y: Tensor, h: Tensor, vera_b: Tensor, lambda_d: Tensor, lambda_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_d, grad_b, g)``, ``g = d ⊙ ((grad_y ⊙ b) B_s)`` in h's dtype (see the module docstring)."""
    return vera_linear_backward_adapter_reference(grad_y, h, vera_b, lambda_d, lambda_b)


# ---------------------------------------------------------------------------------------------
# Fake (shape-only) kernels for torch.compile / meta tensors.
# ---------------------------------------------------------------------------------------------
@vera_linear_forward.register_fake
def _(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input):
    _check_forward(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (vera_b.shape[0],)), x.new_empty(lead + (vera_a.shape[0],), dtype=_h_dtype(x.dtype))


@vera_linear_backward_adapter.register_fake
def _(grad_y, h, vera_b, lambda_d, lambda_b):
    _check_backward_adapter(grad_y, h, vera_b, lambda_d, lambda_b)
    return lambda_d.new_empty(lambda_d.shape), lambda_b.new_empty(lambda_b.shape), h.new_empty(h.shape)


# ---------------------------------------------------------------------------------------------
# Native kernels
# ---------------------------------------------------------------------------------------------
def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _forward_native(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input):
    _check_forward(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)
    native = _CPU_NATIVE if x.device.type == "cpu" else _CUDA_NATIVE
    if x.dtype not in native or (x.device.type == "cuda" and not _lora.HAS_CUDA_KERNELS):
        return vera_linear_forward_reference(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)
    lead, k, n, r = tuple(x.shape[:-1]), x.shape[-1], vera_b.shape[0], vera_a.shape[0]
    m = math.prod(lead)
    if m == 0 or k == 0 or n == 0 or r == 0:  # empty tensors may have no data pointer: nothing for a kernel
        return vera_linear_forward_reference(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input)
    x2 = last_dim_contiguous(x.reshape(m, k))
    xa2 = x2 if adapter_input is None else last_dim_contiguous(adapter_input.reshape(m, k))
    # Slices of the shared projections stay views: their rows are contiguous, their ld is max_in / r_max.
    vera_a, vera_b = last_dim_contiguous(vera_a), last_dim_contiguous(vera_b)
    weight = None if weight is None else last_dim_contiguous(weight)
    bias = None if bias is None else bias.contiguous()
    d32, b32 = _fp32(lambda_d), _fp32(lambda_b).contiguous()
    if _lora._use_fused(x, m):
        cpu = x.device.type == "cpu"
        # The CPU kernels read a bf16 x as it is where their bf16 products are the measured choice, else
        # widened once (M*K, small here), as LoRA's (ops/lora.py rows_input); CUDA reads x in w's dtype.
        x_in = _lora.rows_input(x2, m, k) if cpu else x2
        y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
        if cpu and weight is not None and adapter_input is None:
            # h = x A_sᵀ by the row kernel and the rows after it in one call, as LoRA's fused forward (the
            # h of torch's fp32 GEMM cost a widened x and A_s and ~70 µs at 4096 -> 4096, M = 16, bf16)
            h = _runtime.empty(m, r, dtype=torch.float32, device=x.device)
            _C.lora_fused_cpu(matrix("out", y), matrix("x", x_in), matrix("weight", weight),
                              optional_matrix("bias", bias), matrix("vera_a", vera_a), matrix("vera_b", vera_b),
                              matrix("h", h), matrix("lambda_b", b32), matrix("lambda_d", d32.contiguous()), 1.0,
                              _runtime.num_threads())  # fmt: skip
            return y.reshape(lead + (n,)), h.reshape(lead + (r,))
        xa_in = x_in if adapter_input is None else (_lora.rows_input(xa2, m, k) if cpu else xa2)
        h = _lora.down_projection(xa_in, vera_a, x.dtype, names=("vera_a", "h", "vera_b"))
        if weight is None:
            # Adapter term only: the row kernel with an empty base product (K = 0).
            x_in, weight_in = x_in[:, :0], torch.empty(n, 0, dtype=x.dtype, device=x.device)
        else:
            weight_in = weight
        _lora._fused_rows(y, x_in, weight_in, bias, h, vera_b, 1.0, b32, d32.contiguous(), names=("weight", "h", "vera_b"))
    else:
        y, h = _forward_gemm(x2, xa2, weight, bias, vera_a, vera_b, d32, b32)
    return y.reshape(lead + (n,)), h.reshape(lead + (r,))


def _forward_gemm(x2, xa2, weight, bias, vera_a, vera_b, d32, b32):
    """Many tokens: base GEMM and the adapter term u (b ⊙ B_s)ᵀ accumulated together with addmm."""
    fp32_base = weight is None or _gemm.upcast_tiles_needed(weight) or x2.dtype == torch.float32
    if fp32_base:
        x32 = _fp32(x2)
        h = _gemm.linear(x32 if xa2 is x2 else _fp32(xa2), _fp32(vera_a))
    else:  # the base GEMM takes x as is: h from x_a without an fp32 copy where that is faster
        h = _lora.down_projection_many(xa2, vera_a)
    u = h * d32
    if not fp32_base:
        # bf16/fp16 GEMMs (CUDA, CPUs where torch's bf16 GEMM is the fast one): as LoRA, bias + the adapter
        # term b ⊙ (u B_sᵀ) first (on the CPU one adapter_term call, b its column scale; u and b ⊙ B_s split
        # into 16-bit halves elsewhere), then the base GEMM accumulated onto it: one rounding of the large sum.
        return _lora._base_after_adapter(x2, weight, bias, u, vera_b, 1.0, col_scale=b32), h
    if weight is not None and weight.dtype == torch.float32 and x2.is_cpu:
        # bias + u (b ⊙ B_s)ᵀ first, then the GEMM adds x Wᵀ to it (as LoRA's fp32 CPU path)
        return _lora._base_after_adapter(x32, weight, bias, u, vera_b, 1.0, col_scale=b32), h  # x is fp32 like W
    b_scaled = _fp32(vera_b) * b32[:, None]  # [N, r] fp32: small next to W
    if weight is None:
        y32 = _gemm.linear(u, b_scaled)
    elif weight.dtype == torch.float32:
        y32 = _gemm.linear(x32, weight)
    else:  # bf16 weight on a CPU whose bf16 GEMM is slow: widened tile by tile into one workspace
        y32 = _gemm.linear_t_fp32(x32, weight)
    if weight is not None:
        y32.addmm_(u, b_scaled.t())
    if bias is not None:
        y32.add_(bias)
    if y32.dtype == x2.dtype:
        return y32, h
    y = torch.empty(y32.shape, dtype=x2.dtype, device=x2.device)
    y.copy_(y32)
    return y, h


def _backward_adapter_native(grad_y, h, vera_b, lambda_d, lambda_b):
    _check_backward_adapter(grad_y, h, vera_b, lambda_d, lambda_b)
    return _backward_adapter_checked(grad_y, h, vera_b, lambda_d, lambda_b)


def _backward_adapter_checked(grad_y, h, vera_b, lambda_d, lambda_b):
    """The kernel of ``vera_linear_backward_adapter`` on the autograd backward's own, already checked,
    arguments (lora.py's ``_backward_adapter_checked`` says why they are)."""
    if grad_y.dtype == torch.float64:
        return vera_linear_backward_adapter_reference(grad_y, h, vera_b, lambda_d, lambda_b)
    (n, r), m = vera_b.shape, math.prod(grad_y.shape[:-1])
    h2 = h.reshape(m, r)
    d32, b32, b_s = _fp32(lambda_d), _fp32(lambda_b), _fp32(vera_b)
    u = h2 * d32
    dy = grad_y.reshape(m, n)
    if m > r and _lora.use_adapter_products(dy, m, n, r):
        # g' = dy (b ⊙ B_s) and dyᵀ u from one pass over dy, read in its own dtype (no fp32 copy).
        g_prime, dy_t_u = _lora.adapter_products(last_dim_contiguous(dy), y=b_s * b32[:, None], u=u)
        grad_b = dy_t_u.mul_(b_s).sum(1)
        grad_d = (h2 * g_prime).sum(0)
        return grad_d.to(lambda_d.dtype), grad_b.to(lambda_b.dtype), g_prime.mul_(d32).reshape(h.shape)
    dy32 = _fp32(dy)
    # Each product is M·N·r multiply-adds; the diagonal scaling goes on whichever operand is smaller,
    # and the M x N / N x r temporaries likewise (few tokens: M x N; many tokens: N x r).
    if m <= r:
        g_prime = _gemm.mm(dy32 * b32, b_s)
        grad_b = _gemm.linear(u, b_s).mul_(dy32).sum(0)
    else:
        g_prime = _gemm.mm(dy32, b_s * b32[:, None])
        grad_b = _gemm.mm(dy32.t(), u).mul_(b_s).sum(1)
    grad_d = (h2 * g_prime).sum(0)
    g = g_prime.mul_(d32)
    return grad_d.to(lambda_d.dtype), grad_b.to(lambda_b.dtype), g.reshape(h.shape)


for _device in ("cpu", "cuda"):
    vera_linear_forward.register_kernel(_device)(_forward_native)
    vera_linear_backward_adapter.register_kernel(_device)(_backward_adapter_native)


# ---------------------------------------------------------------------------------------------
# Autograd. The forward op's formula is the one VeRALinearFunction uses (lowrank/autograd.py).
# Saved: h (M x r fp32), x only when W needs a gradient, and references to W, A_s, B_s, d, b.
# ---------------------------------------------------------------------------------------------
def forward_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, adapter_input = inputs
    _, h = output
    ctx.set_materialize_grads(False)  # u / h take no gradient: no zeros made for it
    ctx.has_dropout = adapter_input is not None
    ctx.has_bias = bias is not None
    ctx.x_shape = tuple(x.shape)
    ctx.x_dtype = x.dtype
    # Frozen operands autocast copied for this call are saved as their sources, cast again in the backward.
    (weight, w_cast), (vera_a, a_cast), (vera_b, b_cast) = (_autocast.saved(t) for t in (weight, vera_a, vera_b))
    ctx.casts = (w_cast, a_cast, b_cast)
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, vera_a, vera_b, lambda_d, lambda_b, h)


def forward_backward(ctx, grad_y: Tensor, _grad_h: Optional[Tensor]):
    if grad_y is None:  # only u / h had a gradient (grads are not materialized): it reaches nothing
        return (None,) * 8
    x, weight, vera_a, vera_b, lambda_d, lambda_b, h = ctx.saved_tensors
    vera_a, vera_b = _autocast.restored(vera_a, ctx.casts[1]), _autocast.restored(vera_b, ctx.casts[2])
    need_x, need_w, need_bias, _, _, need_d, need_b, need_xa = ctx.needs_input_grad
    grad_y = grad_y.contiguous()
    grad_x = grad_w = grad_bias = grad_d = grad_b = grad_xa = None
    g = None
    direct = _direct.ok(grad_y)  # eager: the kernels on this forward's own tensors, not checked again
    if need_d or need_b or need_x or need_xa:
        backward_adapter = _backward_adapter_checked if direct else torch.ops.lowrank.vera_linear_backward_adapter
        grad_d, grad_b, g = backward_adapter(grad_y, h, vera_b, lambda_d, lambda_b)
    adapter_grad_to_x = need_x and not ctx.has_dropout
    if need_x and weight is not None:
        weight = _autocast.restored(weight, ctx.casts[0])
        backward_input = _lora._backward_input_checked if direct else torch.ops.lowrank.lora_linear_backward_input
        if ctx.has_dropout:  # the adapter's gradient flows to dropout(x), not to x directly
            grad_x = backward_input(grad_y, weight, None, None)
        else:
            grad_x = backward_input(grad_y, weight, g, vera_a)
    elif adapter_grad_to_x:  # no dense weight: the base layer's own autograd adds grad_y W
        grad_x = _gemm.mm(g.reshape(-1, g.shape[-1]), vera_a.to(g.dtype)).to(ctx.x_dtype).reshape(ctx.x_shape)
    if need_xa and ctx.has_dropout:
        grad_xa = _gemm.mm(g.reshape(-1, g.shape[-1]), vera_a.to(g.dtype)).to(ctx.x_dtype).reshape(ctx.x_shape)
    if need_w and weight is not None:
        n, k = weight.shape
        m = math.prod(ctx.x_shape[:-1])
        grad_w = _gemm.mm(grad_y.reshape(m, n).t(), x.reshape(m, k))
    if need_bias and ctx.has_bias:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    # The projections (vera_a, vera_b) are frozen: they never get gradients.
    return grad_x, grad_w, grad_bias, None, None, grad_d if need_d else None, grad_b if need_b else None, grad_xa


vera_linear_forward.register_autograd(off_in_backward(forward_backward), setup_context=forward_setup_context)
