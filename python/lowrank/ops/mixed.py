"""Mixed-adapter batches: one forward where each row uses its own adapter.

    y[m] = base_out[m] + x[m] Wᵀ + bias + T_a(m)(x_a[m]),    T_i(z) = c_i ⊙ (B_i (s_i · d_i ⊙ (A_i z)))

Adapter ``i`` is ``A_i`` [r_i, K], ``B_i`` [N, r_i], optional ``d_i`` [r_i] (``v_scale``) and ``c_i``
[N] (``col_scale``), and a float ``s_i``: LoRA is ``(A, B, -, -, s)``, VeRA ``(A_s, B_s, λ_d, λ_b, 1)``.
Ranks and scalings may differ per adapter. ``weight``, ``bias`` and ``base_out`` (an fp32 base
product computed elsewhere, e.g. by a 4-bit base) are each optional.

The plan says which rows use which adapter: ``order`` (int32 [M]) is a permutation of the rows
grouped by adapter, adapter ``i``'s rows are ``order[offsets[i]:offsets[i+1]]`` and the rest use no
adapter (:func:`plan_rows` builds it from per-row ids). The kernels walk rows in plan order, so a
group of rows shares one adapter's factors in the register tiles: few tokens (decode) stream W once
for the whole batch and add each row's term in the same pass (BGMV); many tokens run the base GEMM
once and the adapter terms per segment (SGMV). No Python loop over adapters on that path.

Op (``torch.ops.lowrank.*``):

- ``mixed_linear_forward(x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale,
  col_scale, scales, adapter_input) -> (y, h)`` with ``h`` [M, max_r] fp32 in plan order
  (``h[p, :r_i] = A_i x_a[order[p]]``, zero elsewhere), what the backward needs.

Its backward is written with torch ops (a loop over the adapters present: training on mixed
batches is not the serving hot path); each adapter gets the gradient of its own rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _C, _autocast
from .._autocast import off_in_backward
from .._validate import check_tensor, cuda_stream, last_dim_contiguous, matrix, optional_matrix
from . import _gemm, _runtime

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CPU_NATIVE = (torch.float32, torch.bfloat16)
_CUDA_NATIVE = (torch.float32, torch.bfloat16, torch.float16)
HAS_CUDA_KERNELS = hasattr(_C, "mixed_rows_cuda")


def plan_rows(ids: Tensor, num_adapters: int) -> tuple[Tensor, Tensor]:
    """``(order, offsets)`` for per-row adapter ids (``-1``: no adapter): rows grouped by adapter,
    in their original order within a group (a stable counting sort)."""
    check_tensor("ids", ids, dtypes=(torch.int32, torch.int64), ndim=1)
    if not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"num_adapters: expected a positive int, got {num_adapters!r}")
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_adapters):
        raise ValueError(f"ids: expected values in [-1, {num_adapters}), got [{int(ids.min())}, {int(ids.max())}]")
    key = torch.where(ids < 0, torch.full_like(ids, num_adapters), ids)
    order = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.bincount(key, minlength=num_adapters + 1)[:num_adapters]
    offsets = torch.zeros(num_adapters + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return order, offsets


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by every kernel, the fake one included)
# ---------------------------------------------------------------------------------------------
def _check_forward(x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input):
    check_tensor("x", x, dtypes=_FLOATS)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    k, lead = x.shape[-1], tuple(x.shape[:-1])
    m = math.prod(lead)
    count = len(lora_a)
    if count < 1:
        raise ValueError("lora_a: expected at least one adapter")
    for name, seq in (("lora_b", lora_b), ("v_scale", v_scale), ("col_scale", col_scale), ("scales", scales)):
        if len(seq) != count:
            raise ValueError(f"{name}: expected one entry per adapter ({count}), got {len(seq)}")
    check_tensor("lora_b[0]", lora_b[0], ndim=2)
    n = lora_b[0].shape[0]
    if weight is not None:
        check_tensor("weight", weight, dtypes=(x.dtype,), device=x.device, shape=(n, k))
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), device=x.device, shape=(n,))
    if base_out is not None:
        check_tensor("base_out", base_out, dtypes=(torch.float32, torch.float64), device=x.device, shape=lead + (n,))
    check_tensor("order", order, dtypes=(torch.int32,), device=x.device, shape=(m,))
    check_tensor("offsets", offsets, dtypes=(torch.int32,), device=x.device, shape=(count + 1,))
    for i in range(count):
        a, b = lora_a[i], lora_b[i]
        check_tensor(f"lora_a[{i}]", a, dtypes=(x.dtype, torch.float32), device=x.device, ndim=2)
        r = a.shape[0]
        if a.shape[1] != k or r < 1:
            raise ValueError(f"lora_a[{i}]: expected [r >= 1, {k}], got {list(a.shape)}")
        check_tensor(f"lora_b[{i}]", b, dtypes=(a.dtype,), device=x.device, shape=(n, r))
        if v_scale[i] is not None:
            check_tensor(f"v_scale[{i}]", v_scale[i], dtypes=(torch.float32, torch.float64), device=x.device, shape=(r,))
        if col_scale[i] is not None:
            check_tensor(f"col_scale[{i}]", col_scale[i], dtypes=(torch.float32, torch.float64), device=x.device, shape=(n,))
        if not isinstance(scales[i], (int, float)):
            raise TypeError(f"scales[{i}]: expected a float, got {type(scales[i]).__name__}")
    if adapter_input is not None:
        check_tensor("adapter_input", adapter_input, dtypes=(x.dtype,), device=x.device, shape=tuple(x.shape))
    return m, k, n, max(int(a.shape[0]) for a in lora_a)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Reference: the spec, adapter by adapter. fp32 accumulation (fp64 stays fp64), one rounding.
# ---------------------------------------------------------------------------------------------
def mixed_linear_forward_reference(x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input):
    m, k, n, max_r = _check_forward(
        x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input
    )
    acc = _acc(x.dtype)
    x2 = x.reshape(m, k).to(acc)
    xa = x2 if adapter_input is None else adapter_input.reshape(m, k).to(acc)
    y = torch.zeros(m, n, dtype=acc, device=x.device)
    if base_out is not None:
        y += base_out.reshape(m, n).to(acc)
    if weight is not None:
        y += x2 @ weight.to(acc).t()
    if bias is not None:
        y += bias.to(acc)
    h = torch.zeros(m, max_r, dtype=torch.float32, device=x.device)
    order_l, offsets_l = order.long(), offsets.tolist()
    for i in range(len(lora_a)):
        p0, p1 = offsets_l[i], offsets_l[i + 1]
        if p0 == p1:
            continue
        rows = order_l[p0:p1]
        r = lora_a[i].shape[0]
        hi = xa[rows] @ lora_a[i].to(acc).t()
        h[p0:p1, :r] = hi.float()
        vi = hi * scales[i]
        if v_scale[i] is not None:
            vi = vi * v_scale[i].to(acc)
        term = vi @ lora_b[i].to(acc).t()
        if col_scale[i] is not None:
            term = term * col_scale[i].to(acc)
        y[rows] += term
    return y.to(x.dtype).reshape(tuple(x.shape[:-1]) + (n,)), h


@torch.library.custom_op("lowrank::mixed_linear_forward", mutates_args=())
def mixed_linear_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    base_out: Optional[Tensor],
    order: Tensor,
    offsets: Tensor,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    v_scale: list[Optional[Tensor]],
    col_scale: list[Optional[Tensor]],
    scales: list[float],
    adapter_input: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """``(y, h)``: each row's own adapter term added to ``base_out + x Wᵀ + bias`` (see the module)."""
    return mixed_linear_forward_reference(
        x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input
    )


@mixed_linear_forward.register_fake
def _(x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input):
    m, k, n, max_r = _check_forward(
        x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input
    )
    return x.new_empty(tuple(x.shape[:-1]) + (n,)), x.new_empty(m, max_r, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Native kernels
# ---------------------------------------------------------------------------------------------
def adapter_table(lora_a, lora_b, v_scale, col_scale, scales, *, transposed: bool = False) -> tuple["_C.MixedAdapters", list]:
    """The C++ view of the adapters (raw pointers) and the tensors it points into, which the caller
    must keep alive while the view is used. VeRA's scales are read as fp32; B factors of different
    dtypes are all read as fp32. ``transposed``: also keep each Bᵀ in fp32 ([r, N]), what the CPU's
    many-token expand reads (else it transposes per call) — for a view reused across calls."""
    keep, a_m, e_m, vs_m, cs_m, et_m = [], [], [], [], [], []
    if len({b.dtype for b in lora_b}) > 1:  # the kernels' tiles share one dtype for every B
        lora_b = [b.float() for b in lora_b]
    for i, (a, b, d, c) in enumerate(zip(lora_a, lora_b, v_scale, col_scale)):
        a, b = last_dim_contiguous(a), last_dim_contiguous(b)
        d = None if d is None else d.float().contiguous()
        c = None if c is None else c.float().contiguous()
        keep += [a, b, d, c]
        a_m.append(matrix(f"lora_a[{i}]", a))
        e_m.append(matrix(f"lora_b[{i}]", b))
        vs_m.append(optional_matrix(f"v_scale[{i}]", d))
        cs_m.append(optional_matrix(f"col_scale[{i}]", c))
        if transposed and b.device.type == "cpu":
            et = b.t().float().contiguous()
            keep.append(et)
            et_m.append(matrix(f"lora_b[{i}]ᵀ", et))
    return _C.MixedAdapters(a_m, e_m, vs_m, cs_m, [float(s) for s in scales], et_m), keep


def _use_fused(x: Tensor, m: int) -> bool:
    if x.device.type == "cpu":
        return m <= _runtime.cpu_fused_max_m(x.dtype)
    return m <= _runtime.CUDA_FUSED_MAX_M


def _rows(out, x_in, xa_in, w, bias, c, order, offsets, h, table, views=None) -> None:
    """The C++ call. ``views``: prebuilt ``(order, offsets, weight, bias)`` Matrix views (a layer's
    cache), used for the arguments given here as the same tensors."""
    if views is None:
        order_m, offsets_m = matrix("order", order), matrix("offsets", offsets)
        w_m, bias_m = optional_matrix("weight", w), optional_matrix("bias", bias)
    else:
        order_m, offsets_m, w_m, bias_m = views
        w_m = None if w is None else w_m
    args = (
        matrix("out", out),
        matrix("x", x_in),
        optional_matrix("adapter_input", xa_in),
        w_m,
        bias_m,
        optional_matrix("base_out", c),
        order_m,
        offsets_m,
        optional_matrix("h", h),
        table,
    )
    if out.device.type == "cuda":
        with torch.cuda.device(out.device):
            _C.mixed_rows_cuda(*args, cuda_stream(out))
    else:
        _C.mixed_rows_cpu(*args, _runtime.num_threads())


def _forward_native(x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input):
    m, k, n, max_r = _check_forward(
        x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input
    )
    cpu = x.device.type == "cpu"
    native = _CPU_NATIVE if cpu else _CUDA_NATIVE
    if x.dtype not in native or (not cpu and not HAS_CUDA_KERNELS) or m == 0 or n == 0 or k == 0:
        return mixed_linear_forward_reference(
            x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input
        )
    table, keep = adapter_table(lora_a, lora_b, v_scale, col_scale, scales)
    y, h = run(x, weight, bias, base_out, order, offsets, table, adapter_input, need_h=True)
    del keep  # the kernels have returned
    return y, h


def runs_native(x: Tensor) -> bool:
    """True when :func:`run` takes ``x`` (a native dtype on a device with kernels, not empty)."""
    if x.device.type == "cpu":
        return x.dtype in _CPU_NATIVE and x.numel() > 0
    return HAS_CUDA_KERNELS and x.device.type == "cuda" and x.dtype in _CUDA_NATIVE and x.numel() > 0


def run(x, weight, bias, base_out, order, offsets, table, adapter_input=None, *, need_h: bool = False, views=None):
    """The kernels over a prebuilt adapter view (:func:`adapter_table`, whose tensors the caller keeps
    alive): what a layer inside ``lowrank.mixed_batch`` calls, having checked its arguments once.
    ``x`` must satisfy :func:`runs_native`; the C++ entry checks every shape against the view.
    ``need_h=False`` skips ``h`` (an empty one is returned); ``views``: Matrix views of ``(order,
    offsets, weight, bias)`` built once by the caller (contiguous tensors only)."""
    k, n, max_r = table.in_features, table.out_features, table.max_r
    cpu = x.device.type == "cpu"
    lead = tuple(x.shape[:-1])
    m = x.numel() // k
    x2 = last_dim_contiguous(x.reshape(m, k))
    xa2 = None if adapter_input is None else last_dim_contiguous(adapter_input.reshape(m, k))
    # CPU kernels read fp32 activations (M*K widened once); CUDA ones read x's dtype.
    x_in = x2.float() if cpu else x2
    xa_in = None if xa2 is None else (xa2.float() if cpu else xa2)
    h = h_rows = None
    if need_h:
        h = torch.zeros(m, max_r, dtype=torch.float32, device=x.device)
        h_rows = h[: int(offsets[-1])]
    if views is None:
        weight = None if weight is None else last_dim_contiguous(weight)
        bias = None if bias is None else bias.contiguous()
    c = None if base_out is None else last_dim_contiguous(base_out.reshape(m, n).float())
    y = _runtime.empty(m, n, dtype=x.dtype, device=x.device)
    if weight is None or _use_fused(x, m):
        # Few tokens: W streamed once for every row, each row's own term in the same pass (or no W:
        # the caller's base output c plus the terms).
        _rows(y, x_in, xa_in, weight, bias, c, order, offsets, h_rows, table, views)
    elif x.dtype == torch.float32 or not _gemm.upcast_tiles_needed(weight):
        # Many tokens: the adapter terms (and bias, and base_out) first, then the base GEMM accumulates
        # onto them (addmm's C enters its accumulator), as the single-adapter path does.
        _rows(y, x_in, xa_in, None, bias, c, order, offsets, h_rows, table, views)
        y.addmm_(x2, weight.t())
    else:
        # A 16-bit weight on a CPU whose 16-bit GEMM is slow: the base in fp32, rounded once at the end.
        y32 = _gemm.linear_t_fp32(x_in, weight)  # (rows: the row kernel reads base_out row by row)
        if c is not None:
            y32.add_(c)
        _rows(y, x_in, xa_in, None, bias, y32, order, offsets, h_rows, table, views)
    if h is None:
        h = torch.empty(0, max_r, dtype=torch.float32, device=x.device)
    return y.reshape(lead + (n,)), h


for _device in ("cpu", "cuda"):
    mixed_linear_forward.register_kernel(_device)(_forward_native)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, base_out, order, offsets, lora_a, lora_b, v_scale, col_scale, scales, adapter_input = inputs
    _, h = output
    ctx.scales = list(scales)
    ctx.count = len(lora_a)
    ctx.has = (weight is not None, bias is not None, base_out is not None, adapter_input is not None)
    ctx.d_present = [d is not None for d in v_scale]
    ctx.c_present = [c is not None for c in col_scale]
    ctx.x_shape = tuple(x.shape)
    ctx.base_dtype = None if base_out is None else base_out.dtype
    xa = x if adapter_input is None else adapter_input
    ds = [d for d in v_scale if d is not None]
    cs = [c for c in col_scale if c is not None]
    weight, ctx.weight_cast = _autocast.saved(weight)  # a frozen W autocast copied: its source, cast again
    ctx.save_for_backward(x, xa, weight, order, offsets, h, *lora_a, *lora_b, *ds, *cs)


def _backward(ctx, grad_y: Tensor, _grad_h: Optional[Tensor]):
    x, xa, weight, order, offsets, h, *rest = ctx.saved_tensors
    count = ctx.count
    lora_a, lora_b, rest = rest[:count], rest[count : 2 * count], rest[2 * count :]
    it = iter(rest)
    v_scale = [next(it) if p else None for p in ctx.d_present]
    col_scale = [next(it) if p else None for p in ctx.c_present]
    has_w, has_bias, has_base, has_xa = ctx.has
    needs = ctx.needs_input_grad
    need_x, need_w, need_bias, need_base = needs[0], needs[1], needs[2], needs[3]
    need_a, need_b, need_d, need_c, need_xa = needs[6], needs[7], needs[8], needs[9], needs[11]
    k = x.shape[-1]
    n = lora_b[0].shape[0]
    m = math.prod(ctx.x_shape[:-1])
    acc = _acc(grad_y.dtype)
    dy = grad_y.reshape(m, n).to(acc)
    xa2 = xa.reshape(m, k).to(acc)
    dx_adapter = torch.zeros(m, k, dtype=acc, device=x.device) if (need_x or need_xa) else None
    grads_a, grads_b, grads_d, grads_c = [None] * count, [None] * count, [None] * count, [None] * count
    order_l, offsets_l = order.long(), offsets.tolist()
    for i in range(count):
        p0, p1 = offsets_l[i], offsets_l[i + 1]
        a, b, d, c, s = lora_a[i], lora_b[i], v_scale[i], col_scale[i], ctx.scales[i]
        r = a.shape[0]
        rows = order_l[p0:p1]
        hi = h[p0:p1, :r].to(acc)  # A_i x_a of this adapter's rows
        t = dy[rows]
        if c is not None:
            if need_c:
                z = (hi * s * (d.to(acc) if d is not None else 1.0)) @ b.to(acc).t()
                grads_c[i] = (t * z).sum(0).to(c.dtype)
            t = t * c.to(acc)
        tb = t @ b.to(acc)  # [rows, r]: what reaches s·d⊙h
        dscale = s * (d.to(acc) if d is not None else torch.ones(r, dtype=acc, device=x.device))
        if need_b:
            grads_b[i] = (t.t() @ (hi * dscale)).to(b.dtype)
        if need_d and d is not None:
            grads_d[i] = (s * (tb * hi).sum(0)).to(d.dtype)
        g = tb * dscale  # gradient reaching h
        if need_a:
            grads_a[i] = (g.t() @ xa2[rows]).to(a.dtype)
        if dx_adapter is not None:
            dx_adapter.index_add_(0, rows, g @ a.to(acc))
    grad_x = grad_xa = grad_w = grad_bias = grad_base = None
    if need_x:
        weight = _autocast.restored(weight, ctx.weight_cast)
        grad_x = dy @ weight.to(acc) if has_w else torch.zeros(m, k, dtype=acc, device=x.device)
        if not has_xa:
            grad_x = grad_x + dx_adapter
        grad_x = grad_x.to(x.dtype).reshape(ctx.x_shape)
    if need_xa and has_xa:
        grad_xa = dx_adapter.to(xa.dtype).reshape(ctx.x_shape)
    if need_w and has_w:
        grad_w = (dy.t() @ x.reshape(m, k).to(acc)).to(weight.dtype)
    if need_bias and has_bias:
        grad_bias = dy.sum(0).to(grad_y.dtype)
    if need_base and has_base:
        grad_base = grad_y.to(ctx.base_dtype).reshape(ctx.x_shape[:-1] + (n,))
    return (
        grad_x,
        grad_w,
        grad_bias,
        grad_base,
        None,
        None,
        grads_a if need_a else None,
        grads_b if need_b else None,
        grads_d if need_d else None,
        grads_c if need_c else None,
        None,
        grad_xa,
    )


mixed_linear_forward.register_autograd(off_in_backward(_backward), setup_context=_setup_context)
