"""LoRA ops: schema, reference, fake, CPU and CUDA kernels, all in one place.

    y = x Wᵀ + bias + s · (x_a Aᵀ) Bᵀ          x: [..., K], W: [N, K], A: [r, K], B: [N, r]

``x_a`` is the adapter's input: ``x`` itself, or ``dropout(x)`` (PEFT applies dropout to the adapter
path only). ``u = x_a Aᵀ`` is accumulated and returned in fp32; the backward needs it, and only it
and the inputs, never anything the size of ``y``.

Ops (``torch.ops.lowrank.*``):

- ``lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, adapter_input) -> (y, u)``
- ``lora_linear_backward_adapter(grad_y, adapter_input, u, lora_a, lora_b, scale) -> (grad_a, grad_b, g)``
  with ``g = s · grad_y B`` (fp32), the gradient reaching ``u``
- ``lora_linear_backward_input(grad_y, weight, g, lora_a) -> grad_x = grad_y W + g A``

Kernels: few tokens (M up to the measured crossover) take the fused row kernel, which streams W once
and adds the adapter term in the same pass; many tokens take the best GEMM with the adapter
accumulated with it (``addmm``: on the CPU, and for 16-bit dtypes, ``bias + s·u Bᵀ`` first and the base
product added onto it, so the large sum is rounded once). dtypes: fp32/bf16 on CPU, fp32/bf16/fp16 on CUDA; anything
else (fp16 on CPU, fp64, other devices) runs the reference.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _C, _autocast
from .._autocast import off_in_backward
from .._validate import _DTYPES, check_tensor, cuda_stream, last_dim_contiguous, matrix, optional_matrix
from . import _direct, _gemm, _runtime

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CPU_NATIVE = (torch.float32, torch.bfloat16)
_CUDA_NATIVE = (torch.float32, torch.bfloat16, torch.float16)
HAS_CUDA_KERNELS = hasattr(_C, "lora_rows_cuda")
_PLAIN = (Tensor, torch.nn.Parameter)  # no subclass (fake, functional, distributed tensors) takes a shortcut


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by every kernel, the fake one included, so bad input fails at trace time)
# ---------------------------------------------------------------------------------------------
def _check_forward(x, weight, bias, lora_a, lora_b, scale, adapter_input) -> None:
    check_tensor("x", x, dtypes=_FLOATS)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    k = x.shape[-1]
    check_tensor("weight", weight, dtypes=(x.dtype,), device=x.device, ndim=2)
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight: expected [out, {k}] to match x's last dimension {k}, got {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), device=x.device, shape=(n,))
    check_tensor("lora_a", lora_a, dtypes=(x.dtype, torch.float32), device=x.device, ndim=2)
    r = lora_a.shape[0]
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a: expected [r, {k}], got {list(lora_a.shape)}")
    check_tensor("lora_b", lora_b, dtypes=(lora_a.dtype,), device=x.device, shape=(n, r))
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if adapter_input is not None:
        check_tensor("adapter_input", adapter_input, dtypes=(x.dtype,), device=x.device, shape=tuple(x.shape))


def _check_backward_adapter(grad_y, adapter_input, u, lora_a, lora_b, scale) -> None:
    check_tensor("lora_a", lora_a, dtypes=_FLOATS, ndim=2)
    r, k = lora_a.shape
    check_tensor("lora_b", lora_b, dtypes=(lora_a.dtype,), device=lora_a.device, ndim=2)
    n = lora_b.shape[0]
    if lora_b.shape[1] != r:
        raise ValueError(f"lora_b: expected [out, {r}], got {list(lora_b.shape)}")
    check_tensor("grad_y", grad_y, dtypes=_FLOATS, device=lora_a.device)
    if grad_y.dim() < 1 or grad_y.shape[-1] != n:
        raise ValueError(f"grad_y: expected [..., {n}], got {list(grad_y.shape)}")
    lead = tuple(grad_y.shape[:-1])
    check_tensor("adapter_input", adapter_input, dtypes=(grad_y.dtype,), device=lora_a.device, shape=lead + (k,))
    check_tensor("u", u, dtypes=(torch.float32,), device=lora_a.device, shape=lead + (r,))


def _check_backward_input(grad_y, weight, g, lora_a) -> None:
    check_tensor("grad_y", grad_y, dtypes=_FLOATS)
    check_tensor("weight", weight, dtypes=(grad_y.dtype,), device=grad_y.device, ndim=2)
    n, k = weight.shape
    if grad_y.dim() < 1 or grad_y.shape[-1] != n:
        raise ValueError(f"grad_y: expected [..., {n}] to match weight [out={n}, in={k}], got {list(grad_y.shape)}")
    check_adapter_grad(grad_y, g, lora_a, k)


def check_adapter_grad(grad_y, g, lora_a, k: int) -> None:
    """The adapter half of an input gradient ``grad_y W + g A``: ``g`` [..., r] fp32 (fp64 for fp64
    grad_y) and ``A`` [r, k], both or neither. Shared by the LoRA, VeRA and NF4 input-gradient ops."""
    if (g is None) != (lora_a is None):
        raise ValueError("g and lora_a: give both or neither")
    if g is not None:
        check_tensor("lora_a", lora_a, dtypes=(grad_y.dtype, torch.float32), device=grad_y.device, ndim=2)
        r = lora_a.shape[0]
        if lora_a.shape[1] != k:
            raise ValueError(f"lora_a: expected [r, {k}], got {list(lora_a.shape)}")
        g_dtypes = (torch.float32, torch.float64) if grad_y.dtype == torch.float64 else (torch.float32,)
        check_tensor("g", g, dtypes=g_dtypes, device=grad_y.device, shape=tuple(grad_y.shape[:-1]) + (r,))


# ---------------------------------------------------------------------------------------------
# Reference kernels: the spec. fp32 accumulation (fp64 stays fp64), one rounding at the end.
# ---------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_linear_forward_reference(x, weight, bias, lora_a, lora_b, scale, adapter_input):
    _check_forward(x, weight, bias, lora_a, lora_b, scale, adapter_input)
    acc = _acc(x.dtype)
    xa = x if adapter_input is None else adapter_input
    u = xa.to(acc) @ lora_a.to(acc).t()
    y = x.to(acc) @ weight.to(acc).t() + scale * (u @ lora_b.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), u.to(torch.float32)


def lora_linear_backward_adapter_reference(grad_y, adapter_input, u, lora_a, lora_b, scale):
    _check_backward_adapter(grad_y, adapter_input, u, lora_a, lora_b, scale)
    acc = _acc(grad_y.dtype)
    n, (r, k), m = lora_b.shape[0], lora_a.shape, math.prod(grad_y.shape[:-1])
    dy = grad_y.reshape(m, n).to(acc)
    xa = adapter_input.reshape(m, k).to(acc)
    u2 = u.reshape(m, r).to(acc)
    grad_b = scale * dy.t() @ u2
    g = scale * dy @ lora_b.to(acc)
    grad_a = g.t() @ xa
    return grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), g.to(torch.float32).reshape(u.shape)


def lora_linear_backward_input_reference(grad_y, weight, g, lora_a):
    _check_backward_input(grad_y, weight, g, lora_a)
    acc = _acc(grad_y.dtype)
    dx = grad_y.to(acc) @ weight.to(acc)
    if g is not None:
        dx = dx + g.to(acc) @ lora_a.to(acc)
    return dx.to(grad_y.dtype)


# ---------------------------------------------------------------------------------------------
# Schemas. The decorated bodies are the default kernel (any device): the reference.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lowrank::lora_linear_forward", mutates_args=())
def lora_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    adapter_input: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """``(y, u)``: ``y = x Wᵀ + bias + scale·u Bᵀ`` in x's dtype, ``u = x_a Aᵀ`` in fp32."""
    return lora_linear_forward_reference(x, weight, bias, lora_a, lora_b, scale, adapter_input)


@torch.library.custom_op("lowrank::lora_linear_backward_adapter", mutates_args=())
def lora_linear_backward_adapter(
    grad_y: Tensor, adapter_input: Tensor, u: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_a, grad_b, g)``: ``g = s·grad_y B`` (fp32), ``grad_b = s·grad_yᵀ u``, ``grad_a = gᵀ x_a``."""
    return lora_linear_backward_adapter_reference(grad_y, adapter_input, u, lora_a, lora_b, scale)


@torch.library.custom_op("lowrank::lora_linear_backward_input", mutates_args=())
def lora_linear_backward_input(grad_y: Tensor, weight: Tensor, g: Optional[Tensor], lora_a: Optional[Tensor]) -> Tensor:
    """``grad_x = grad_y W + g A`` in grad_y's dtype."""
    return lora_linear_backward_input_reference(grad_y, weight, g, lora_a)


# ---------------------------------------------------------------------------------------------
# Fake (shape-only) kernels for torch.compile / meta tensors.
# ---------------------------------------------------------------------------------------------
@lora_linear_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, adapter_input):
    _check_forward(x, weight, bias, lora_a, lora_b, scale, adapter_input)
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (weight.shape[0],)), x.new_empty(lead + (lora_a.shape[0],), dtype=torch.float32)


@lora_linear_backward_adapter.register_fake
def _(grad_y, adapter_input, u, lora_a, lora_b, scale):
    _check_backward_adapter(grad_y, adapter_input, u, lora_a, lora_b, scale)
    return lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), u.new_empty(u.shape)


@lora_linear_backward_input.register_fake
def _(grad_y, weight, g, lora_a):
    _check_backward_input(grad_y, weight, g, lora_a)
    return grad_y.new_empty(tuple(grad_y.shape[:-1]) + (weight.shape[1],))


# ---------------------------------------------------------------------------------------------
# Native kernels
# ---------------------------------------------------------------------------------------------
def _fused_rows(out, x, w, bias, v, e, scale, col_scale=None, v_scale=None, *, names=("weight", "u", "lora_b")) -> None:
    """out = x wᵀ + scale·col_scale ⊙ ((v ⊙ v_scale) eᵀ) + bias through the C++/CUDA row kernel (all 2-D,
    validated here). ``col_scale`` ([N] fp32, VeRA's b) scales the adapter term per output column,
    ``v_scale`` ([R] fp32, VeRA's d) per rank; ``names`` are the caller's names for w, v and e in errors."""
    w_name, v_name, e_name = names
    args = (
        matrix("out", out),
        matrix("x", x),
        matrix(w_name, w),
        optional_matrix("bias", bias),
        optional_matrix(v_name, v),
        optional_matrix(e_name, e),
        optional_matrix("lambda_b", col_scale),
        optional_matrix("lambda_d", v_scale),
        float(scale),
    )
    if out.device.type == "cuda":
        with torch.cuda.device(out.device):
            _C.lora_rows_cuda(*args, cuda_stream(out))
    else:
        _C.lora_rows_cpu(*args, _runtime.num_threads())


def down_projection(xa_in: Tensor, a: Tensor, x_dtype: torch.dtype, names=("lora_a", "u", "lora_b")) -> Tensor:
    """``u = x_a aᵀ`` ([M, r], fp32) for the fused paths. On the CPU torch's fp32 GEMM does this small
    product faster than a row-kernel launch (576 → r=16, M=1: 3 vs 7 µs; a bf16 x_a, kept for the row
    kernel's bf16 products, is widened for it: M·K, few here); on CUDA the row kernel reads x_a in a's
    dtype."""
    if xa_in.device.type == "cpu":
        xa32 = xa_in if xa_in.dtype == torch.float32 else xa_in.float()
        return torch.mm(xa32, (a if a.dtype == torch.float32 else a.float()).t())
    if a.dtype != x_dtype:
        xa_in = xa_in.to(a.dtype)
    u = _runtime.empty(xa_in.shape[0], a.shape[0], dtype=torch.float32, device=xa_in.device)
    _fused_rows(u, xa_in, a, None, None, None, 1.0, names=names)
    return u


def adapter_products(
    x2: Tensor,
    *,
    y: Optional[Tensor] = None,
    y_transposed: bool = False,
    u: Optional[Tensor] = None,
    scale: float = 1.0,
    c_dtype: torch.dtype = torch.float32,
    d_dtype: torch.dtype = torch.float32,
    d_transposed: bool = False,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(c, d)`` with ``c = scale·x y`` ([M, R]; y [K, R], or [R, K] read transposed) and ``d =
    scale·xᵀ u`` ([K, R], or [R, K] with ``d_transposed``), either or both from one pass over the CPU
    matrix ``x2`` [M, K] (fp32 or bf16, read as is: no widened copy) — csrc/cpu/adapter_products.cpp.
    fp32 accumulation, one rounding to ``c_dtype`` / ``d_dtype``. All of M, K and R must be positive."""
    m, k = x2.shape
    c = d = None
    if y is not None:
        c = _runtime.empty(m, y.shape[0] if y_transposed else y.shape[1], dtype=c_dtype, device=x2.device)
    if u is not None:
        r = u.shape[1]
        d = _runtime.empty(*((r, k) if d_transposed else (k, r)), dtype=d_dtype, device=x2.device)
    _C.adapter_products_cpu(optional_matrix("c", c), optional_matrix("d", d), matrix("x", x2), optional_matrix("y", y),
                            optional_matrix("u", u), y_transposed, d_transposed, float(scale),
                            _runtime.num_threads())  # fmt: skip
    return c, d


def adapter_term(out: Tensor, u: Tensor, e: Tensor, bias: Optional[Tensor] = None, scale: float = 1.0, *,
                 e_transposed: bool = False, col_scale: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """``out = bias + scale·col_scale ⊙ u eᵀ`` on the CPU ([M, N]; u fp32 [M, R], e [N, R] or [R, N]
    with ``e_transposed``, col_scale fp32 [N] or None): fp32 products and sums, one rounding to out's
    dtype, in one call (csrc/cpu/adapter_products.cpp) — the adapter's term of the bf16 many-token GEMM
    paths, where torch's skinny bf16 GEMM needs u split into 16-bit halves to keep it exact, and costs
    several times the products themselves. Returns ``out``."""
    u, e = last_dim_contiguous(u), last_dim_contiguous(e)  # held until the kernel returns
    cs = None if col_scale is None else col_scale.reshape(1, -1)
    _C.adapter_term_cpu(matrix("out", out), matrix("u", u), matrix("e", e), optional_matrix("bias", bias),
                        float(scale), e_transposed, _runtime.num_threads(), optional_matrix("col_scale", cs))  # fmt: skip
    return out


def use_adapter_products(t: Tensor, m: int, k: int, r: int) -> bool:
    """The adapter's products of a CPU tensor ``t`` ([m, k] rows against rank r) go to
    :func:`adapter_products` rather than torch's GEMMs (where this machine measured it faster)."""
    return t.is_cpu and t.dtype in _CPU_NATIVE and min(m, k, r) > 0 and _runtime.cpu_adapter_products(t.dtype, r)


def _use_fused(x: Tensor, m: int) -> bool:
    if x.device.type == "cpu":
        return x.dtype in _CPU_NATIVE and m <= _runtime.cpu_fused_max_m(x.dtype)
    return HAS_CUDA_KERNELS and x.dtype in _CUDA_NATIVE and m <= _runtime.CUDA_FUSED_MAX_M


def _forward_native(x, weight, bias, lora_a, lora_b, scale, adapter_input):
    _check_forward(x, weight, bias, lora_a, lora_b, scale, adapter_input)
    native = _CPU_NATIVE if x.device.type == "cpu" else _CUDA_NATIVE
    if x.dtype not in native or (x.device.type == "cuda" and not HAS_CUDA_KERNELS):
        return lora_linear_forward_reference(x, weight, bias, lora_a, lora_b, scale, adapter_input)
    lead, k, n, r = tuple(x.shape[:-1]), x.shape[-1], weight.shape[0], lora_a.shape[0]
    m = math.prod(lead)
    if m == 0 or k == 0 or n == 0:  # empty tensors may have no data pointer: nothing for a kernel
        return lora_linear_forward_reference(x, weight, bias, lora_a, lora_b, scale, adapter_input)
    x2 = last_dim_contiguous(x.reshape(m, k))
    xa2 = x2 if adapter_input is None else last_dim_contiguous(adapter_input.reshape(m, k))
    weight, lora_a, lora_b = (last_dim_contiguous(t) for t in (weight, lora_a, lora_b))
    bias = None if bias is None else bias.contiguous()
    if _use_fused(x, m) and x.device.type == "cpu" and adapter_input is None:
        u = _runtime.empty(m, r, dtype=torch.float32, device=x.device)
        y = _fused_cpu(_views(weight, bias, lora_a, lora_b), x2, n, scale, u)
    elif _use_fused(x, m):
        # CPU: a bf16 x as the measured choice takes it (rows_input: read as is, or widened once).
        cpu = x.device.type == "cpu"
        x_in = rows_input(x2, m, k) if cpu else x2
        xa_in = x_in if adapter_input is None else (rows_input(xa2, m, k) if cpu else xa2)
        u = down_projection(xa_in, lora_a, x.dtype)
        y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
        _fused_rows(y, x_in, weight, bias, u, lora_b, scale)
    else:
        y, u = _forward_gemm(x2, xa2, weight, bias, lora_a, lora_b, scale)
    return y.reshape(lead + (n,)), u.reshape(lead + (r,))


class FrozenOperands:
    """A layer's weight, bias and adapter factors as kernel views, checked and built once and rebuilt
    only when one of them changes (pointer, shape, strides, dtype or device: a new tensor, ``.data``
    assigned, ``.to()``). Values may change freely (an optimizer step): the views point at them.

    The eager CPU few-token calls use it (inference, and the training forward and backward), where
    building six views and checking five tensors per call cost more than the 64 → 64 product itself.
    ``state`` is one ``(signature, views)`` tuple, replaced whole, so threads sharing a layer never see
    half of one. A copy of the layer starts empty (views point into the original's memory)."""

    __slots__ = ("state", "plan")

    def __init__(self):
        self.state = None
        self.plan = None  # a CallPlan for the next inference call (ops/lora.py, ops/nf4.py), or None

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())

    @staticmethod
    def signature(*tensors) -> tuple:
        return tuple([None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors])

    def lookup(self, key: tuple, build: Callable[[], Optional[tuple]]) -> Optional[tuple]:
        """The ``(key, views)`` state for ``key``: the one held, or ``build()``'s views (checked and made
        there; None where the shortcut does not apply) kept for the next call."""
        state = self.state
        if state is None or state[0] != key:
            views = build()
            if views is None:
                return None
            state = self.state = (key, views)
        return state

    @staticmethod
    def plain_cpu(*tensors, contiguous: bool = False) -> bool:
        """Every tensor given is a plain CPU tensor (no subclass) whose rows a kernel view can take
        (last dimension contiguous, or all of it with ``contiguous``)."""
        return all(t is None or (type(t) in _PLAIN and t.is_cpu and (t.is_contiguous() if contiguous else t.stride(-1) == 1))
                   for t in tensors)  # fmt: skip


def eager_cpu(x) -> bool:
    """``x`` is a plain CPU tensor of a dtype the CPU kernels take, outside torch.compile: a call on it
    may use the eager shortcuts (forward_fast here and in nf4.py)."""
    return type(x) is Tensor and x.is_cpu and not torch.compiler.is_compiling() and x.dim() >= 1 and x.dtype in _CPU_NATIVE


def rows(x: Tensor, m: int, k: int) -> Tensor:
    """``x`` as ``[m, k]`` rows a kernel reads: last dimension contiguous, rows at least ``k`` apart."""
    x2 = x if x.dim() == 2 else x.reshape(m, k)  # (reshape costs a microsecond even when it is a no-op)
    if x2.stride(-1) != 1 or (m > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    return x2


def fold_rows(x: Tensor) -> Tensor:
    """``x`` as a frozen ``nn.Linear`` should be given it: as it is, or copied into plain row-major strides
    where its leading dimensions are no view of rows.

    torch's matmul (2.13) runs ``[..., K] @ Wᵀ`` as one GEMM over ``x`` viewed as ``[M, K]`` rows when
    that view exists, or when ``W`` requires grad (copying ``x`` into rows). For a frozen ``W`` and
    leading dimensions that are no view of rows it takes a batched matmul instead, over ``Wᵀ`` expanded
    to every batch entry, which on the CPU copies the whole weight once per entry. Transformers'
    prefill hands the output head just that: ``hidden[:, -1:, :]``, strides ``[T·K, K, 1]``. SmolLM2-135M's
    head (49152 × 576, bf16, a Zen 4, 2 threads) took 39-55 ms that way at batch 1 and 478 ms at batch 8,
    against 4-5 ms over rows (PyTorch issue 186148). The copy made here has the plain strides of its
    shape (``contiguous()`` would keep batch 1's ``[T·K, K, 1]``: a size-1 dimension's stride does not
    make a tensor non-contiguous, but it does stop the fold) and costs next to nothing beside that:
    ``M × K`` values."""
    if x.dim() > 2:
        sizes, strides = x.shape, x.stride()
        for i in range(x.dim() - 2):
            if strides[i] != strides[i + 1] * sizes[i + 1]:
                return x.clone(memory_format=torch.contiguous_format)
    return x


def frozen_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a frozen weight alone, no adapter (an output head lowrank froze, a
    layer's base with its adapters merged or disabled), over ``x`` as :func:`fold_rows` gives it. With W
    and the bias frozen, a plain CPU fp32/bf16 call:

    - no gradient wanted of ``x`` and a token count this machine measured the row kernel faster at
      (``cpu_rows_max_m``): the row kernel streams W once (fp32 sums, one rounding; a bf16 x read as
      it is or widened, as the fused LoRA rows choose);
    - bf16 where this machine measured torch's bf16 GEMM slower than widening (``cpu_bf16_gemm``, an
      AVX2 CPU): fp32 GEMMs over W widened tile by tile, rounded once, ``dx = dy W`` the same way
      (``_gemm.WidenedFrozenLinearFunction``).

    Anything else goes to ``_gemm.dense_linear`` (the measured fp32 GEMM, with its own backward; torch's
    otherwise), which raises on bad arguments as ``F.linear`` does. Under autocast it is ``F.linear``
    itself (autocast's casts and output dtype), but for a few tokens without gradients over an fp32 W,
    which take the row kernel on W as it is (:func:`fp32_rows_under_autocast`), and with a gradient of x
    wanted, where the backward casts W again rather than keeping the forward's copy
    (``_gemm.CastFrozenLinearFunction``)."""
    x = fold_rows(x)
    if torch.is_autocast_enabled(x.device.type):
        dtype = _autocast.dtype_for(x)
        fp32_frozen = (dtype is not None and weight.dtype is torch.float32 and not weight.requires_grad
                       and (bias is None or (not bias.requires_grad and bias.is_floating_point()
                                             and bias.dtype is not torch.float64)))  # fmt: skip
        if fp32_frozen and fp32_rows_under_autocast(x, weight, _runtime.cpu_rows_max_m):
            with _autocast.off(x):
                return frozen_linear(x.to(dtype).float(), weight, _autocast.cast(bias, torch.float32)).to(dtype)
        if fp32_frozen and torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
            with _autocast.off(x):  # F.linear's casts, without keeping the copy of W for the backward
                return _gemm.CastFrozenLinearFunction.apply(x, weight, bias, dtype)
        return torch.nn.functional.linear(x, weight, bias)
    if (
        eager_cpu(x)
        and type(weight) in _PLAIN
        and weight.dtype is x.dtype
        and weight.is_cpu
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and weight.shape[0] > 0
        and (bias is None or (type(bias) in _PLAIN and bias.dtype is x.dtype and bias.is_cpu
                              and bias.shape == weight.shape[:1]))  # fmt: skip
    ):
        n, k = weight.shape
        m = x.numel() // k if k else 0
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        if (
            0 < m <= _runtime.cpu_rows_max_m(x.dtype)
            and frozen
            and not (torch.is_grad_enabled() and x.requires_grad)
            and weight.stride(-1) == 1
            and weight.stride(0) >= k
        ):
            x_in = rows_input(x, m, k)  # held here until the kernel returns: a Matrix is only its address
            y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
            _C.lora_rows_cpu(matrix("out", y), matrix("x", x_in), matrix("weight", weight),
                             optional_matrix("bias", bias), None, None, None, None, 1.0, _runtime.num_threads())  # fmt: skip
            return y.view(*x.shape[:-1], n)
        if x.dtype is torch.bfloat16 and frozen and m > 0 and not _gemm.cpu_bf16_gemm_native():
            return _gemm.WidenedFrozenLinearFunction.apply(x, weight, bias)
    return _gemm.dense_linear(x, weight, bias)


def fp32_rows_under_autocast(x: Tensor, weight: Tensor, max_m: Callable[[torch.dtype], int]) -> bool:
    """Whether a call under autocast reads an fp32 ``weight`` as it is rather than in autocast's dtype: a
    plain CPU call of ``0 < M <= max_m(torch.float32)`` tokens (the row kernel's measured crossover:
    ``_runtime.cpu_fused_max_m`` or ``cpu_rows_max_m``) without gradients (decoding under autocast). Autocast
    would copy W to bf16 for that one call, a pass over W that costs more than the product it feeds (the
    row kernel streams W once); instead x is rounded to autocast's dtype as autocast rounds it, the row
    kernel sums in fp32 over the fp32 W, and the output is rounded once to autocast's dtype. Few-token
    calls over a bf16 W, and every call with gradients, cast as ``F.linear`` casts."""
    if torch.is_grad_enabled() or type(weight) not in _PLAIN or weight.dtype is not torch.float32:
        return False
    if not (weight.is_cpu and eager_cpu(x) and x.shape[-1] == weight.shape[-1]):
        return False
    k = x.shape[-1]
    return 0 < (x.numel() // k if k else 0) <= max_m(torch.float32)


def rows_fp32(x: Tensor, m: int, k: int) -> Tensor:
    """``x`` as ``[m, k]`` rows the CPU kernels read: fp32 (a bf16 x widened once), last dimension
    contiguous, rows at least ``k`` apart."""
    x2 = rows(x, m, k)
    return x2 if x2.dtype == torch.float32 else x2.float()


def rows_input(x: Tensor, m: int, k: int) -> Tensor:
    """``x`` as ``[m, k]`` rows for the fused CPU row kernel: a bf16 x stays bf16 where this machine
    measured the kernel's bf16 products faster (``cpu_lora_bf16_rows``: AVX512-BF16, against a bf16 W),
    else it is widened once to fp32 (:func:`rows_fp32`)."""
    if x.dtype == torch.bfloat16 and _runtime.cpu_lora_bf16_dot():
        return rows(x, m, k)
    return rows_fp32(x, m, k)


def _frozen_state(frozen: FrozenOperands, x, weight, bias, lora_a, lora_b, scale) -> Optional[tuple]:
    """``(signature, (weight, bias, lora_a, lora_b views))`` of ``frozen`` for a few-token eager CPU call
    of the fused row kernel (the measured choice for ``x``'s token count), or None where that shortcut
    does not apply (the op's usual path then runs). Raises as the op would on bad arguments."""
    if not (eager_cpu(x) and x.dtype == weight.dtype and type(weight) in _PLAIN):
        return None
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not (0 < m <= _runtime.cpu_fused_max_m(x.dtype) and k == weight.shape[-1] and weight.shape[0] > 0):
        return None
    def build():
        _check_forward(x, weight, bias, lora_a, lora_b, scale, None)  # raises, naming the argument
        return _views(weight, bias, lora_a, lora_b) if FrozenOperands.plain_cpu(weight, bias, lora_a, lora_b) else None

    return frozen.lookup(FrozenOperands.signature(weight, bias, lora_a, lora_b), build)


def _views(weight, bias, lora_a, lora_b) -> tuple:
    # (cached between calls, keyed by the tensors' addresses: the views must not keep replaced tensors alive)
    return (matrix("weight", weight, hold=False), optional_matrix("bias", bias, hold=False),
            matrix("lora_a", lora_a, hold=False), matrix("lora_b", lora_b, hold=False))


def _fused_cpu(views: tuple, x, n: int, scale, u: Optional[Tensor]) -> Tensor:
    """y ([M, n], x's dtype) through ``lora_fused_cpu`` with the views of W, bias, A and B: u = x Aᵀ
    (into ``u`` when given, else a scratch buffer) and the fused rows in one call. A bf16 x is read as
    it is where the bf16 products are the measured choice, else widened once (M·K elements, few here)."""
    k = x.shape[-1]
    m = x.numel() // k
    mw, mb, ma, me = views
    y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
    x_in = rows_input(x, m, k)  # held here until the kernel returns: a Matrix is only its address
    _C.lora_fused_cpu(matrix("out", y), matrix("x", x_in), mw, mb, ma, me, None if u is None else matrix("u", u),
                      None, None, float(scale), _runtime.num_threads())  # fmt: skip
    return y


class CallPlan:
    """One layer's few-token inference call with everything but ``x`` fixed, for the calls after the
    first: the C++ side (``_C.RowsPlan``: the weight's kernel view, bias, B, scale and dtypes) and what
    it was made for — the layer's tensors (``key``: their signatures, and for a tiled NF4 copy their
    version counters and the tensors themselves), x's dtype, the thread count and the measured choices in
    force then (``mode``). The callers re-read those per call (:meth:`tokens` and ``_planned_forward`` here
    and in ops/nf4.py: a decision pinned or re-measured since, another thread count, another tensor: no
    fit, and the caller takes the full path, which makes a new plan). A call through
    the plan runs the same kernel on the same views as the full path: the same bits, in a third of the
    Python (64 → 64, M=1: the full path's 12 µs were mostly views, signatures and checks rebuilt per call)."""

    __slots__ = ("key", "dtype", "k", "n", "threads", "mode", "widen", "rows", "scale", "blocksize", "refs")

    def __init__(self, key: tuple, dtype: torch.dtype, k: int, n: int, mode, widen: bool, rows: "_C.RowsPlan",
                 scale: float, blocksize: int = 0):  # fmt: skip
        self.key, self.dtype, self.k, self.n, self.mode, self.widen = key, dtype, k, n, mode, widen
        self.rows, self.scale, self.blocksize = rows, scale, blocksize
        self.threads = torch.get_num_threads()
        self.refs = None  # weak references to the tensors a derived copy the plan reads was made from (ops/nf4.py)

    def tokens(self, x) -> int:
        """``x``'s token count where x is a plain contiguous CPU tensor of the plan's dtype and width, ``0``
        where the plan cannot take it."""
        shape = x.shape
        if (type(x) is not Tensor or x.dtype is not self.dtype or not shape or shape[-1] != self.k or not x.is_cpu
                or not x.is_contiguous() or torch.get_num_threads() != self.threads
                or torch.compiler.is_compiling()):  # fmt: skip
            return 0
        return x.numel() // self.k

    def output(self, x, m: int) -> Tensor:
        """A fresh CPU ``y`` of x's leading shape (a tuple argument costs ~0.3 µs more than unpacked sizes)."""
        dtype = self.dtype
        y = torch.empty(m, self.n, dtype=dtype) if x.dim() == 2 else torch.empty(*x.shape[:-1], self.n, dtype=dtype)
        return y.fill_(float("nan")) if _runtime.poison_outputs else y


def _lora_mode(dtype: torch.dtype, m: int) -> Optional[bool]:
    """The fused LoRA rows' measured choices for ``m`` tokens of ``dtype``: None where the fused kernel is
    not the choice, else whether a bf16 x is widened (rows_input)."""
    if not 0 < m <= _runtime.cpu_fused_max_m(dtype):
        return None
    return dtype is torch.bfloat16 and not _runtime.cpu_lora_bf16_dot()


def _planned_forward(plan: CallPlan, x, key, scale) -> Optional[Tensor]:
    m = plan.tokens(x)
    if not m or key != plan.key or scale != plan.scale or _lora_mode(plan.dtype, m) is not plan.widen:
        return None
    x_in = x.float() if plan.widen else x
    y = plan.output(x, m)
    plan.rows.run(y.data_ptr(), x_in.data_ptr(), m, 0, plan.threads)
    return y


def forward_fast(frozen: FrozenOperands, x, weight, bias, lora_a, lora_b, scale) -> Tensor:
    """``y`` of ``lora_linear_forward`` (no dropout) for inference, through the fused row kernel with
    the per-layer views of ``frozen`` where that kernel is the measured choice (eager, plain CPU
    tensors, fp32/bf16, few tokens); otherwise through the op as usual. Same kernel, same bits. After
    one such call the next go through ``frozen.plan`` (:class:`CallPlan`) while it fits."""
    plan = frozen.plan
    if plan is not None:
        y = _planned_forward(plan, x, FrozenOperands.signature(weight, bias, lora_a, lora_b), scale)
        if y is not None:
            return y
    state = _frozen_state(frozen, x, weight, bias, lora_a, lora_b, scale)
    if state is not None:
        n = weight.shape[0]
        y = _fused_cpu(state[1], x, n, scale, None)
        frozen.plan = _lora_plan(state, x, n, scale)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)
    op = _forward_native if _direct.ok(x) else torch.ops.lowrank.lora_linear_forward
    return op(x, weight, bias, lora_a, lora_b, scale, None)[0]


def _lora_plan(state: tuple, x, n: int, scale) -> Optional[CallPlan]:
    """A CallPlan of the fused LoRA rows for calls like ``x`` (None where the measured choices for it are
    not the fused kernel's)."""
    k = x.shape[-1]
    widen = _lora_mode(x.dtype, x.numel() // k if k else 0)
    if widen is None:
        return None
    mw, mb, ma, me = state[1]
    x_code = _DTYPES[torch.float32 if widen else x.dtype]
    rows = _C.RowsPlan.lora(mw, mb, ma, me, float(scale), x_code, _DTYPES[x.dtype])
    return CallPlan(state[0], x.dtype, k, n, widen, widen, rows, scale)


def forward_train_fast(frozen: FrozenOperands, x, weight, bias, lora_a, lora_b, scale) -> Optional[tuple]:
    """``(y, u)`` of ``lora_linear_forward`` (no dropout) through the fused row kernel with ``frozen``'s
    views, for the autograd forward of a few-token eager CPU call; None where that shortcut does not
    apply. (The backward finds the views in ``frozen`` too: :func:`_backward_fast`.)"""
    state = _frozen_state(frozen, x, weight, bias, lora_a, lora_b, scale)
    if state is None or lora_a.shape[0] == 0:
        return None
    n, r = weight.shape[0], lora_a.shape[0]
    lead = tuple(x.shape[:-1])
    u = _runtime.empty(math.prod(lead), r, dtype=torch.float32, device=x.device)
    y = _fused_cpu(state[1], x, n, scale, u)
    return y.reshape(lead + (n,)), u.reshape(lead + (r,))


def _forward_gemm(x2, xa2, weight, bias, lora_a, lora_b, scale):
    """Many tokens: the base GEMM and the adapter term accumulated together with addmm (the term first,
    _base_after_adapter; fp32 on CUDA: the adapter added into the GEMM's output)."""
    if _gemm.upcast_tiles_needed(weight):
        x32 = x2.float()
        xa32 = x32 if xa2 is x2 else xa2.float()
        u = _gemm.linear(xa32, lora_a.float())
        y32 = _gemm.linear_t_fp32(x32, weight)
        y32.addmm_(u, lora_b.float().t(), alpha=scale)
        if bias is not None:
            y32.add_(bias)
        y = torch.empty(y32.shape, dtype=x2.dtype, device=x2.device)
        y.copy_(y32)
        return y, u
    if x2.dtype == torch.float32 and not x2.is_cpu:
        u = torch.mm(xa2, lora_a.t() if lora_a.dtype == torch.float32 else lora_a.float().t())
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        y.addmm_(u, lora_b.t() if lora_b.dtype == torch.float32 else lora_b.float().t(), alpha=scale)
        return y, u
    # The CPU, and 16-bit GEMMs (CUDA, or CPUs where torch's bf16 GEMM is the fast one, as measured): u
    # in fp32. The adapter term and the bias go first, into c = bias + s·u Bᵀ, with nothing rounded
    # before that sum (_base_after_adapter). Then the GEMM adds c to its fp32 accumulator (addmm's C, or
    # oneDNN's sum post-op for the CPU's fp32), so the large sum x Wᵀ + c is rounded once (only c's own,
    # much smaller, rounding comes before it). Measured against y = x Wᵀ followed by the adapter's pass
    # over y, with torch's fp32 GEMM: a LoRA r=16 training step of one 576 → 1536 layer at M = 512 (Zen 4,
    # 100 interleaved rounds) took 1.11x nn.Linear's time against 1.14x (bf16, with adapter_term: 1.21x
    # against 1.27x).
    u = down_projection_many(xa2, lora_a)
    return _base_after_adapter(x2, weight, bias, u, lora_b, scale), u


def down_projection_many(xa2: Tensor, a: Tensor) -> Tensor:
    """``u = x_a aᵀ`` in fp32 ([M, r]) for many 16-bit tokens: the adapter products kernel reads x_a
    as is where this machine measured it faster; else x_a and a widened to fp32 for torch's GEMM."""
    m, k = xa2.shape
    if use_adapter_products(xa2, m, k, a.shape[0]):
        return adapter_products(xa2, y=last_dim_contiguous(a), y_transposed=True)[0]
    return _gemm.linear(xa2.float(), a.float())


def _base_after_adapter(x2, weight, bias, u, e, scale, col_scale=None):
    """``x Wᵀ + bias + scale·col_scale ⊙ u eᵀ`` in x's dtype (16-bit, or fp32 on the CPU; ``col_scale``
    [N] fp32 or None, VeRA's b): the adapter term (u fp32, e any float dtype) and bias summed first and
    rounded once, then the base GEMM accumulated onto it (addmm's C enters the fp32 accumulator), so the
    large sum is rounded once. adapter_term takes the column scale as it is; elsewhere it scales e (N·r
    values, small next to W) first. The first sum:
    on the CPU the measured fp32 GEMM (fp32) or adapter_term (bf16: fp32 products, one call); elsewhere one
    16-bit GEMM with fp32 accumulation over u and e each split into two 16-bit halves (hi + lo), so
    nothing is rounded before it: bias + s·[u_hi u_lo u_hi]·[e_hi e_hi e_lo]ᵀ, a rank-3r product (no
    M x N fp32 temporary). The measured fp32 GEMM: torch's or oneDNN's, ops/_gemm.py's linear."""
    dtype = x2.dtype
    term_kernel = x2.is_cpu and dtype in _CPU_NATIVE and dtype != torch.float32
    if col_scale is not None and not term_kernel:
        e = (e if e.dtype == torch.float32 else e.float()) * col_scale[:, None]
    if x2.is_cpu and dtype == torch.float32:  # c = bias + (s·u) eᵀ, then x Wᵀ added in the GEMM's accumulator
        e32 = e if e.dtype == torch.float32 else e.float()
        c = _gemm.linear(u if scale == 1.0 else u * scale, e32, bias=bias)
        return _gemm.linear(x2, weight, add=c)
    if term_kernel:  # c = bias + s·col_scale ⊙ u eᵀ in fp32, rounded once, in one call (adapter_term)
        c = adapter_term(_runtime.empty(x2.shape[0], weight.shape[0], dtype=dtype, device=x2.device), u, e, bias, scale,
                         col_scale=col_scale)  # fmt: skip
        return c.addmm_(x2, weight.t())
    us_hi, us_lo = split_16bit(u * scale if scale != 1.0 else u, dtype)  # s folded in while still fp32
    e_hi, e_lo = split_16bit(e, dtype)
    left, right = [us_hi, us_lo], [e_hi, e_hi]
    if e_lo is not None:
        left.append(us_hi)
        right.append(e_lo)
    left, right = torch.cat(left, 1), torch.cat(right, 1)
    c = torch.addmm(bias.to(dtype), left, right.t()) if bias is not None else torch.mm(left, right.t())
    c.addmm_(x2, weight.t())
    return c


def split_16bit(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """``t ≈ hi + lo`` with both in the 16-bit ``dtype`` (16 significant bits together); ``lo`` is None
    when ``t`` is in ``dtype`` already (exact)."""
    if t.dtype == dtype:
        return t, None
    hi = t.to(dtype)
    return hi, (t.float() - hi.float()).to(dtype)


def _backward_adapter_native(grad_y, adapter_input, u, lora_a, lora_b, scale):
    _check_backward_adapter(grad_y, adapter_input, u, lora_a, lora_b, scale)
    return _backward_adapter_checked(grad_y, adapter_input, u, lora_a, lora_b, scale)


def _backward_adapter_checked(grad_y, adapter_input, u, lora_a, lora_b, scale):
    """The kernel of ``lora_linear_backward_adapter`` on arguments already known good: the autograd
    backward's own (the forward checked its inputs and made u; autograd checks grad_y's shape, dtype and
    device against y's)."""
    if grad_y.dtype == torch.float64:
        return lora_linear_backward_adapter_reference(grad_y, adapter_input, u, lora_a, lora_b, scale)
    n, (r, k), m = lora_b.shape[0], lora_a.shape, math.prod(grad_y.shape[:-1])
    dy = grad_y.reshape(m, n)
    if n > 0 and use_adapter_products(dy, m, k, r):
        # g = s·dy B and grad_B = s·dyᵀ u from one pass over dy, then grad_A = gᵀ x_a: dy and x_a are
        # read in their own dtype (no fp32 copies), each gradient rounded once to its parameter's dtype.
        g, grad_b = adapter_products(last_dim_contiguous(dy), y=last_dim_contiguous(lora_b),
                                     u=last_dim_contiguous(u.reshape(m, r)), scale=scale, d_dtype=lora_b.dtype)  # fmt: skip
        _, grad_a = adapter_products(last_dim_contiguous(adapter_input.reshape(m, k)), u=g, d_transposed=True,
                                     d_dtype=lora_a.dtype)  # fmt: skip
        return grad_a, grad_b, g.reshape(u.shape)
    dy32 = dy if dy.dtype == torch.float32 else dy.float()
    u2 = u.reshape(m, r)
    b32 = lora_b if lora_b.dtype == torch.float32 else lora_b.float()
    xa = adapter_input.reshape(m, k)
    xa32 = xa if xa.dtype == torch.float32 else xa.float()
    # The scale on the small operands (u, B: M·r and N·r values), none on the M x N ones.
    grad_b = _gemm.mm(dy32.t(), u2 if scale == 1.0 else u2 * scale)
    g = _gemm.mm(dy32, b32 if scale == 1.0 else b32 * scale)
    grad_a = _gemm.mm(g.t(), xa32)
    return grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), g.reshape(u.shape)


def _backward_input_native(grad_y, weight, g, lora_a):
    _check_backward_input(grad_y, weight, g, lora_a)
    return _backward_input_checked(grad_y, weight, g, lora_a)


def _backward_input_checked(grad_y, weight, g, lora_a):
    """The kernel of ``lora_linear_backward_input`` on arguments already known good (see
    :func:`_backward_adapter_checked`)."""
    if grad_y.dtype == torch.float64:
        return lora_linear_backward_input_reference(grad_y, weight, g, lora_a)
    n, k = weight.shape
    lead = tuple(grad_y.shape[:-1])
    dy = grad_y.reshape(math.prod(lead), n)
    g2 = None if g is None else g.reshape(dy.shape[0], g.shape[-1])
    m = dy.shape[0]
    if m == 0 or k == 0 or n == 0:
        return lora_linear_backward_input_reference(grad_y, weight, g, lora_a)
    if grad_y.device.type == "cpu" and grad_y.dtype in _CPU_NATIVE and m <= _runtime.cpu_input_grad_max_m(grad_y.dtype):
        # Few tokens: stream W once by rows, partial sums per task (csrc/cpu/lora_input_grad.cpp).
        # Every tensor whose pointer the kernel gets is held in a local until it returns.
        # A bf16 dy is read as is: by the kernel's bf16 products where this machine measured them faster,
        # else widened by the kernel into its reused scratch.
        dy = last_dim_contiguous(dy)
        weight = last_dim_contiguous(weight)
        g2 = None if g2 is None else last_dim_contiguous(g2)
        lora_a = None if lora_a is None else last_dim_contiguous(lora_a)
        tasks = _runtime.num_threads()
        workspace = torch.empty(tasks * m, k, dtype=torch.float32)
        dx = _runtime.empty(m, k, dtype=grad_y.dtype, device=grad_y.device)
        _C.lora_input_grad_cpu(
            matrix("out", dx),
            matrix("grad_y", dy),
            matrix("weight", weight),
            optional_matrix("g", g2),
            optional_matrix("lora_a", lora_a),
            matrix("workspace", workspace),
            tasks,
            dy.dtype == torch.bfloat16 and _runtime.cpu_input_grad_bf16_dot(),
        )
        return dx.reshape(lead + (k,))
    if _gemm.upcast_tiles_needed(weight):
        dx32 = _gemm.matmul_fp32(dy.float(), weight)
        if g2 is not None:
            dx32.addmm_(g2, lora_a.float())
        return dx32.to(grad_y.dtype).reshape(lead + (k,))
    if g2 is not None and dy.is_cpu and dy.dtype in _CPU_NATIVE:
        # g A first, then the GEMM adds dy W to it in its fp32 accumulator, as the forward does: by the
        # measured fp32 GEMM (torch's or oneDNN's), or for bf16 by adapter_term (fp32 sums rounded once; no
        # 16-bit copies of g).
        if dy.dtype == torch.float32:
            ga = _gemm.mm(g2, lora_a if lora_a.dtype == torch.float32 else lora_a.float())
            return _gemm.mm(dy, weight, add=ga).reshape(lead + (k,))
        dx = adapter_term(_runtime.empty(m, k, dtype=dy.dtype, device=dy.device), g2, lora_a, e_transposed=True)
        return dx.addmm_(dy, weight).reshape(lead + (k,))
    dx = _gemm.mm(dy, weight)
    if g2 is not None:
        dx.addmm_(g2.to(dx.dtype), lora_a.to(dx.dtype))
    return dx.reshape(lead + (k,))


for _device in ("cpu", "cuda"):
    lora_linear_forward.register_kernel(_device)(_forward_native)
    lora_linear_backward_adapter.register_kernel(_device)(_backward_adapter_native)
    lora_linear_backward_input.register_kernel(_device)(_backward_input_native)


# ---------------------------------------------------------------------------------------------
# Autograd. The forward op's formula is the one LoRALinearFunction uses (lowrank/autograd.py);
# the two backward ops are (bi)linear, so their own derivatives are written with plain torch ops
# (double backward, and opcheck with requires-grad inputs).
# ---------------------------------------------------------------------------------------------
def forward_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scale, adapter_input = inputs[:7]
    _, u = output
    ctx.set_materialize_grads(False)  # u / h take no gradient: no zeros made for it
    frozen = inputs[7] if len(inputs) > 7 else None  # LoRALinearFunction's: the layer's kernel views
    ctx.frozen_state = None if frozen is None else frozen.state
    ctx.scale = scale
    ctx.has_dropout = adapter_input is not None
    ctx.has_bias = bias is not None
    ctx.x_shape = tuple(x.shape)
    xa = x if adapter_input is None else adapter_input
    # x itself only when W needs a gradient; the adapter needs x_a and u. Nothing the size of y, and no
    # per-call 16-bit copy of a frozen W under autocast: its source, cast again in the backward.
    weight, ctx.weight_cast = _autocast.saved(weight)
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, xa, weight, lora_a, lora_b, u)


def _backward_fast(state: tuple, grad_y: Tensor, xa, weight, lora_a, lora_b, u, scale) -> Optional[tuple]:
    """``(grad_x, grad_a, grad_b)`` in one ``lora_backward_cpu`` call with the forward's kernel views
    (``state``), for few tokens on the CPU, where per-call costs decide; None where it does not apply
    (then the usual path runs). The views are used only while the saved tensors still are what they
    point at (a ``.data`` assignment between forward and backward falls back). Only where the adapter's
    products go to lowrank's kernel anyway (``cpu_adapter_products``): the call computes them that way,
    and an eager call must give the bits the op registry's path gives."""
    if not (grad_y.is_cpu and grad_y.dtype in _CPU_NATIVE and type(grad_y) is Tensor):
        return None
    (n, k), r = weight.shape, lora_a.shape[0]
    if not _runtime.cpu_adapter_products(grad_y.dtype, r):
        return None
    m = grad_y.numel() // n
    if m > _runtime.cpu_input_grad_max_m(grad_y.dtype):
        return None
    key = state[0]
    if FrozenOperands.signature(weight, lora_a, lora_b) != (key[0], key[2], key[3]):
        return None
    mw, _, ma, mb = state[1]
    dx = _runtime.empty(m, k, dtype=grad_y.dtype, device=grad_y.device)
    grad_a = _runtime.empty(r, k, dtype=lora_a.dtype, device=grad_y.device)
    grad_b = _runtime.empty(n, r, dtype=lora_b.dtype, device=grad_y.device)
    g = _runtime.empty(m, r, dtype=torch.float32, device=grad_y.device)
    dy, xa2, u2 = grad_y.reshape(m, n), rows(xa, m, k), u.reshape(m, r)  # held until the kernel returns
    _C.lora_backward_cpu(matrix("dx", dx), matrix("grad_a", grad_a), matrix("grad_b", grad_b), matrix("g", g),
                         matrix("grad_y", dy), matrix("adapter_input", xa2), matrix("u", u2), mw, ma, mb, float(scale),
                         _runtime.num_threads(), dy.dtype == torch.bfloat16 and _runtime.cpu_input_grad_bf16_dot())  # fmt: skip
    return dx, grad_a, grad_b


def forward_backward(ctx, grad_y: Tensor, _grad_u: Optional[Tensor]):
    if grad_y is None:  # only u / h had a gradient (grads are not materialized): it reaches nothing
        return (None,) * 7
    x, xa, weight, lora_a, lora_b, u = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, _, need_xa = ctx.needs_input_grad[:7]
    grad_y = grad_y.contiguous()
    grad_x = grad_w = grad_bias = grad_a = grad_b = grad_xa = None
    g = None
    direct = _direct.ok(grad_y)  # eager: the kernels on this forward's own tensors, not checked again
    state = getattr(ctx, "frozen_state", None)
    fast = None
    if state is not None and direct and need_x and not ctx.has_dropout and not need_w:
        fast = _backward_fast(state, grad_y, xa, weight, lora_a, lora_b, u, ctx.scale)
    if fast is not None:
        grad_x = fast[0].reshape(ctx.x_shape)
        grad_a, grad_b = fast[1], fast[2]
    elif need_a or need_b or need_x or need_xa:
        backward_adapter = _backward_adapter_checked if direct else torch.ops.lowrank.lora_linear_backward_adapter
        grad_a, grad_b, g = backward_adapter(grad_y, xa, u, lora_a, lora_b, ctx.scale)
    if need_x and fast is None:
        weight = _autocast.restored(weight, ctx.weight_cast)
        backward_input = _backward_input_checked if direct else torch.ops.lowrank.lora_linear_backward_input
        if ctx.has_dropout:  # the adapter's gradient flows to dropout(x), not to x directly
            grad_x = backward_input(grad_y, weight, None, None)
        else:
            grad_x = backward_input(grad_y, weight, g, lora_a)
    if need_xa and ctx.has_dropout:
        grad_xa = _gemm.mm(g.reshape(-1, g.shape[-1]), lora_a.float()).to(xa.dtype).reshape(xa.shape)
    n, k = weight.shape
    m = math.prod(ctx.x_shape[:-1])
    if need_w:
        grad_w = _gemm.mm(grad_y.reshape(m, n).t(), x.reshape(m, k))
    if need_bias and ctx.has_bias:
        grad_bias = grad_y.reshape(m, n).sum(0)
    return grad_x, grad_w, grad_bias, grad_a if need_a else None, grad_b if need_b else None, None, grad_xa


def _backward_adapter_setup_context(ctx, inputs, output) -> None:
    grad_y, adapter_input, u, lora_a, lora_b, scale = inputs
    _, _, g = output
    ctx.scale = scale
    ctx.save_for_backward(grad_y, adapter_input, u, lora_b, g)


def _backward_adapter_backward(ctx, gg_a, gg_b, gg_g):
    # (grad_a, grad_b, g) = (gᵀ x_a, s·dyᵀ u, s·dy B): bilinear in (dy, x_a, u, B).
    grad_y, xa, u, lora_b, g = ctx.saved_tensors
    s, n, r, k = ctx.scale, lora_b.shape[0], lora_b.shape[1], xa.shape[-1]
    m = math.prod(grad_y.shape[:-1])
    dy, xa2, u2, g2 = grad_y.reshape(m, n).float(), xa.reshape(m, k).float(), u.reshape(m, r), g.reshape(m, r)
    gg_a = torch.zeros(r, k, device=u.device) if gg_a is None else gg_a.float()
    gg_b = torch.zeros(n, r, device=u.device) if gg_b is None else gg_b.float()
    gg_g = torch.zeros(m, r, device=u.device) if gg_g is None else gg_g.reshape(m, r).float()
    total_g = gg_g + xa2 @ gg_a.t()  # everything that reaches g, through g itself and through grad_a
    d_dy = s * (total_g @ lora_b.float().t() + u2 @ gg_b.t())
    d_xa = g2 @ gg_a
    d_u = s * (dy @ gg_b)
    d_b = s * (dy.t() @ total_g)
    return (
        d_dy.to(grad_y.dtype).reshape(grad_y.shape),
        d_xa.to(xa.dtype).reshape(xa.shape),
        d_u.reshape(u.shape),
        None,
        d_b.to(lora_b.dtype),
        None,
    )


def _backward_input_setup_context(ctx, inputs, output) -> None:
    grad_y, weight, g, lora_a = inputs
    ctx.save_for_backward(grad_y, weight, g, lora_a)


def _backward_input_backward(ctx, gg_x):
    # grad_x = dy W + g A: linear in each argument.
    grad_y, weight, g, lora_a = ctx.saved_tensors
    n, k = weight.shape
    m = math.prod(grad_y.shape[:-1])
    ggx = gg_x.reshape(m, k).float()
    d_dy = (ggx @ weight.float().t()).to(grad_y.dtype).reshape(grad_y.shape)
    d_w = (grad_y.reshape(m, n).float().t() @ ggx).to(weight.dtype)
    d_g = d_a = None
    if g is not None:
        d_g = (ggx @ lora_a.float().t()).reshape(g.shape)
        d_a = (g.reshape(m, -1).t() @ ggx).to(lora_a.dtype)
    return d_dy, d_w, d_g, d_a


lora_linear_forward.register_autograd(off_in_backward(forward_backward), setup_context=forward_setup_context)
lora_linear_backward_adapter.register_autograd(
    off_in_backward(_backward_adapter_backward), setup_context=_backward_adapter_setup_context
)
lora_linear_backward_input.register_autograd(
    off_in_backward(_backward_input_backward), setup_context=_backward_input_setup_context
)
