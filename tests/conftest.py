"""Shared test setup: NaN-poisoned kernel outputs, devices, CPU kernel variants, seeding, and the
precision-derived comparison every numeric test uses.

Poisoning: LOWRANK_POISON_OUTPUTS=1 is set before lowrank is imported, so every output buffer a
native kernel writes starts as NaN; an element a kernel forgets to write fails the comparison
instead of passing with whatever the allocator left there.
"""

from __future__ import annotations

import os

os.environ["LOWRANK_POISON_OUTPUTS"] = "1"
# Code paths are measured on this machine (ops/_dispatch.py) but not cached in the user's home by tests.
os.environ.setdefault("LOWRANK_CALIBRATION", "process")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lowrank import _C  # noqa: E402  (imported after the env var above, so poisoning is on)
from lowrank.ops import _gemm, _runtime  # noqa: E402
from lowrank.ops import lora as lora_ops  # noqa: E402

_runtime.poison_outputs = True  # in case lowrank was imported before this file ran

HAS_CUDA = bool(torch.cuda.is_available() and lora_ops.HAS_CUDA_KERNELS)

# "cpu" always; "cuda" only where a GPU is usable and lowrank was built with CUDA kernels.
devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])

_CUDA_SKIP = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and lowrank's CUDA kernels")


def device_param(device: str, *values, id=None):
    """A pytest.param for ``device`` (first value) that skips cleanly when it is cuda and none is usable."""
    marks = [pytest.mark.cuda, _CUDA_SKIP] if device == "cuda" else []
    return pytest.param(device, *values, marks=marks, id=id)


# Native dtypes per device (fp16 has native kernels on CUDA only; on CPU it runs the reference).
NATIVE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT[dtype]


def device_dtype_params():
    """(device, dtype) pairs for every native dtype on cpu and cuda; cuda ones skip without a GPU."""
    return [
        device_param(dev, dt, id=f"{dev}-{dtype_name(dt)}") for dev in ("cpu", "cuda") for dt in NATIVE_DTYPES[dev]
    ]


@pytest.fixture(params=list(_C.supported_cpu_isas()))
def cpu_isa(request):
    """Runs the test once per CPU kernel variant this CPU supports; restores the original after."""
    original = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    assert _C.cpu_isa() == request.param
    try:
        yield request.param
    finally:
        _C.set_cpu_isa(original)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh random data per test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# Every M goes to a fused kernel when its crossover is set this high; none does at -1 (not even M=0).
_ALWAYS, _NEVER = 1 << 30, -1


@pytest.fixture
def force_path(monkeypatch):
    """``force_path("fused" | "gemm")``: make the dispatcher send every M to the fused row kernels
    (forward) and the few-token input-gradient kernel (backward), or to the GEMM path."""

    def force(path: str) -> None:
        if path not in ("fused", "gemm"):
            raise ValueError(path)
        limit = _ALWAYS if path == "fused" else _NEVER
        monkeypatch.setattr(_runtime, "CPU_FUSED_MAX_M", {dt: limit for dt in (torch.float32, torch.bfloat16)})
        monkeypatch.setattr(_runtime, "CUDA_FUSED_MAX_M", limit)
        monkeypatch.setattr(_runtime, "CPU_INPUT_GRAD_MAX_M", {dt: limit for dt in (torch.float32, torch.bfloat16)})

    return force


@pytest.fixture
def adapter_products(monkeypatch):
    """``adapter_products(True | False)``: the adapter's many-token products (the backward's g, grad_A,
    grad_B; the bf16 forward's u) go to lowrank's kernel (csrc/cpu/adapter_products.cpp) or to torch's
    GEMMs, whatever this machine measured."""

    def force(kernel: bool) -> None:
        monkeypatch.setattr(_runtime, "CPU_ADAPTER_PRODUCTS", {dt: kernel for dt in (torch.float32, torch.bfloat16)})

    return force


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the native kernels (lowrank._C.lora_*, adapter_products_cpu) called during the test, in
    call order."""
    calls = []
    for name in [n for n in dir(_C) if n.startswith("lora_") or n == "adapter_products_cpu"]:
        original = getattr(_C, name)

        def spy(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(_C, name, spy)
    return calls


# ---------------------------------------------------------------------------------------------
# Precision-derived comparison
# ---------------------------------------------------------------------------------------------
# The kernel's largest error against the float64 result may be at most ERROR_FACTOR times the largest
# error of the pure-PyTorch reference computed in the same dtype, plus a floor of FLOOR_ROUNDINGS fp32
# roundings (unit roundoff 2^-24) of the largest |term| sum (``magnitude``: the same float64 formula
# evaluated on the inputs' absolute values). The floor matters where the reference happens to be exact
# or lucky, and where the reference's fp32 GEMM and lowrank's sum in different orders: torch.mm (MKL)
# and oneDNN's GEMM, which lowrank takes for fp32 where this machine measured it faster
# (cpu_fp32_gemm), are both fp32 accumulations, yet at K ~ 1000 MKL's blocked sums erred by 0.4-1 of
# these roundings and oneDNN's by 2.7-6. A sum of K terms may err by ~sqrt(K) of them; 8 stays 2^13
# below one bf16 rounding of the same terms, so the bf16 tests keep their teeth.
ERROR_FACTOR = 3.0
FP32_UNIT_ROUNDOFF = 2.0**-24
FLOOR_ROUNDINGS = 8


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    return (got.double() - exact.double()).abs().max().item()


def assert_error_within(name: str, got, same_dtype_ref, exact, magnitude=None, *, factor: float = ERROR_FACTOR,
                        extra_roundings: int = 0) -> None:
    """``got`` (kernel) is no further from ``exact`` (float64) than ``factor`` x the reference's own error."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(exact.shape)}"
    assert got.dtype == same_dtype_ref.dtype, f"{name}: dtype {got.dtype} != reference dtype {same_dtype_ref.dtype}"
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an output element was never written?)"
    scale = (exact if magnitude is None else magnitude).double().abs().max().item()
    floor = FLOOR_ROUNDINGS * FP32_UNIT_ROUNDOFF * scale
    if extra_roundings:  # a path that rounds an intermediate of the output's size to got's dtype
        floor += extra_roundings * torch.finfo(got.dtype).eps / 2 * exact.double().abs().max().item()
    err = max_error(got, exact)
    err_ref = max_error(same_dtype_ref, exact)
    bound = factor * err_ref + floor
    assert err <= bound, (
        f"{name}: max error {err:.3g} vs float64 exceeds {factor:g} x the same-dtype reference's "
        f"{err_ref:.3g} + floor {floor:.3g} (term magnitude {scale:.3g})"
    )


def took_native_16bit_gemm(x: torch.Tensor, weight) -> bool:
    """True when a forward of x over ``weight`` runs torch's own 16-bit GEMM (the many-token path on
    CUDA, or on a CPU whose bf16 GEMM measured faster than widening), not a lowrank kernel."""
    from lowrank.ops import _gemm

    if weight is None or x.dtype == torch.float32 or x.dtype == torch.float64:
        return False
    m = 1
    for d in x.shape[:-1]:
        m *= d
    if x.device.type == "cpu":  # (fp16 on the CPU runs the reference)
        return x.dtype == torch.bfloat16 and m > _runtime.cpu_fused_max_m(x.dtype) and not _gemm.upcast_tiles_needed(weight)
    return m > _runtime.CUDA_FUSED_MAX_M


def same_dtype_reference(op_reference, plain, exact, native_16bit: bool):  # see also extra_roundings
    """PyTorch's own error in the same dtype (STYLE): the op's reference (fp32 accumulation, one rounding)
    and, where the path under test is torch's 16-bit GEMM, plain PyTorch in that dtype — whichever is
    farther from the exact answer. (That path accumulates base, adapter and bias in one fp32
    accumulator but rounds the small adapter-plus-bias term to 16 bits before it: up to ~1 ulp.)"""
    if not native_16bit:
        return op_reference
    return plain if max_error(plain, exact) > max_error(op_reference, exact) else op_reference


def absolute(t):
    """|t| in float64 (None stays None; a float becomes its absolute value)."""
    if t is None:
        return None
    if isinstance(t, (int, float)):
        return abs(t)
    return t.detach().double().abs()


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch LoRA (the oracle when run in float64; PyTorch's own error when run in a low dtype)
# ---------------------------------------------------------------------------------------------
def plain_lora_linear(x, weight, bias, lora_a, lora_b, scale, adapter_input=None):
    """``y = x Wᵀ + bias + s·(x_a Aᵀ) Bᵀ`` with plain torch ops (differentiable), in the inputs' dtypes."""
    xa = x if adapter_input is None else adapter_input
    base = torch.nn.functional.linear(x, weight, bias)
    u = torch.nn.functional.linear(xa.to(lora_a.dtype), lora_a)
    return base + scale * torch.nn.functional.linear(u, lora_b).to(base.dtype)


def fp64(t):
    """A float64 copy of ``t`` (None stays None)."""
    return None if t is None else t.detach().double()


def lora_forward_fp64(x, weight, bias, lora_a, lora_b, scale, adapter_input=None):
    """The exact answer for the given (already rounded) inputs: ``(y, u)`` in float64."""
    xa = fp64(x if adapter_input is None else adapter_input)
    u = xa @ fp64(lora_a).t()
    y = fp64(x) @ fp64(weight).t() + scale * (u @ fp64(lora_b).t())
    if bias is not None:
        y = y + fp64(bias)
    return y, u


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` (a module-level function) for the test: each call still runs it and appends
    to the returned list (its length: the number of calls)."""
    calls = []
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


# torch's GEMMs, and oneDNN's (ops/_gemm.py's op; None in a torch built without it)
GEMM_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.linear.default, _gemm._LINEAR)  # fmt: skip


def aten_calls(fn):
    """``(calls, result)`` of ``fn()``: each aten op it ran with the shapes and dtypes of its tensor
    arguments, ``(op, ((shape, dtype), ...))``, in order (lowrank's own kernels, called through ``_C``,
    are no aten ops and do not appear)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((func, tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        out = fn()
    return record.calls, out


def within_linear_rounding(y, x, w, bias=None) -> bool:
    """``y`` is ``x wᵀ + bias`` summed in fp32 and rounded once to y's dtype: each element within
    (K + 2) fp32 roundings of its |terms| plus half an ulp of y's dtype (0 for fp32) of itself."""
    x2, w2 = x.double().reshape(-1, x.shape[-1]), w.double()
    exact = x2 @ w2.t() + (0.0 if bias is None else bias.double())
    terms = x2.abs() @ w2.abs().t() + (0.0 if bias is None else bias.double().abs())
    half_ulp = 2.0**-8 if y.dtype == torch.bfloat16 else 0.0
    bound = terms * (x.shape[-1] + 2) * 2.0**-24 + exact.abs() * half_ulp
    return bool(((y.double().reshape(exact.shape) - exact).abs() <= bound).all())


def layouts(t: torch.Tensor) -> dict:
    """``t``'s values (2-D or more) in other memory layouts, by name: a transposed view of column-major
    storage (what the tiled NF4 forward had returned), rows inside a wider buffer, every other row of a
    buffer, and (3-D or more) the leading dimensions swapped. Each view holds the only
    reference to its buffer, so a kernel wrapper's contiguous copy of it is a temporary: a wrapper that
    lets a copy go before its kernel has read it reads freed memory (then the next copy's values)."""
    n = t.shape[-1]
    rows = t.reshape(-1, n)

    def column_major():
        store = torch.full((n, rows.shape[0]), float("nan"), dtype=t.dtype)
        store.copy_(rows.t())
        return store.t().reshape(t.shape)  # (a view: [rows, n] with strides (1, rows))

    def wider():
        store = torch.full((rows.shape[0], n + 7), float("nan"), dtype=t.dtype)
        store[:, 3 : 3 + n] = rows
        return store[:, 3 : 3 + n].view(t.shape)

    def every_other_row():
        store = torch.full((2 * rows.shape[0], n), float("nan"), dtype=t.dtype)
        store[::2] = rows
        return store[::2].view(t.shape)

    out = {"column_major": column_major(), "wider": wider(), "every_other_row": every_other_row()}
    if t.dim() >= 3:
        store = t.transpose(0, 1).contiguous()
        out["swapped"] = store.transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Whole-model helpers (transformers, imported when used)
# ---------------------------------------------------------------------------------------------
def tiny_adapted_llama(dtype: torch.dtype, config=None):
    """A 2-layer Llama (hidden 64) with ``config``'s adapter (default LoRA r=4) on every projection, each
    trainable tensor that starts at zero (LoRA's B, full fine-tuning's ΔW) drawn nonzero, so the
    adapters matter."""
    import transformers

    import lowrank

    llama = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=97, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama).to(dtype)
    model = lowrank.inject(model, config if config is not None else lowrank.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith("lora_A.weight"):
                p.normal_(0, 0.1)
    return model


def tiny_lora_llama(dtype: torch.dtype):
    """:func:`tiny_adapted_llama` with LoRA r=4."""
    return tiny_adapted_llama(dtype)


def token_ids(seed: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(2, 97, shape, generator=torch.Generator().manual_seed(seed))


def train_once(model, ids) -> list:
    """One forward with ``labels=ids`` and backward in training mode: [the loss, then each trainable
    parameter's gradient]."""
    loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]


def assert_same_training(got: list, want: list, dtype: torch.dtype) -> None:
    """:func:`train_once`'s results alike within fp32 sums in other orders and the model's dtype."""
    bf16 = dtype == torch.bfloat16
    assert torch.allclose(got[0].float(), want[0].float(), rtol=2e-2 if bf16 else 1e-5, atol=2e-2 if bf16 else 1e-5)
    for a, b in zip(got[1:], want[1:]):
        assert torch.allclose(a.float(), b.float(), rtol=5e-2 if bf16 else 1e-4, atol=5e-3 if bf16 else 1e-6)


def recompute_rebuilds(monkeypatch, base, recipe: str) -> int:
    """Train ``base`` and a :func:`lowrank.recompute_pointwise` copy of it once on the same tokens: the same
    loss and gradients bit for bit (asserted); returns how many outputs ``lowrank.recompute.<recipe>``
    rebuilt in the copy's backward (every saved tensor considered: MIN_BYTES 0)."""
    import copy

    import lowrank

    lean = lowrank.recompute_pointwise(copy.deepcopy(base))
    rebuilt = count_calls(monkeypatch, lowrank.recompute, recipe)
    monkeypatch.setattr(lowrank.recompute, "MIN_BYTES", 0)
    ids = token_ids(4)
    for a, b in zip(train_once(base, ids), train_once(lean, ids)):
        assert torch.equal(a, b)
    return len(rebuilt)
