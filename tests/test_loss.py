"""lowrank's cross-entropy (ops/loss.py, csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu) against
float64, against torch's and transformers' losses, on bad input, and as a causal LM's loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank import _C
from lowrank.ops import loss as loss_ops

from conftest import GEMM_OPS, HAS_CUDA, aten_calls, device_dtype_params, dtype_name, max_error

# (rows, classes): one element, fewer classes than a vector, a vector and a tail, SmolLM2's vocabulary.
SHAPES = [(1, 1), (3, 7), (17, 15), (5, 33), (9, 257), (40, 1000), (3, 49152)]
EPS32 = 2.0**-24


def _exact(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad_loss: torch.Tensor):
    """(loss, lse, grad) in float64 from the logits' own values."""
    x = logits.detach().double()
    valid = labels != ignore_index
    lse = torch.logsumexp(x, dim=1)
    picked = x.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    loss = torch.where(valid, lse - picked, 0.0)
    p = torch.exp(x - lse[:, None])
    one_hot = torch.zeros_like(p).scatter_(1, torch.where(valid, labels, 0)[:, None], 1.0)
    grad = torch.where(valid[:, None], (p - one_hot) * grad_loss.double()[:, None], 0.0)
    return loss, torch.where(valid, lse, 0.0), grad


def _torch_fp32(logits, labels, ignore_index, grad_loss):
    """torch's own fp32 computation (what transformers runs), rounded as the kernels' outputs are."""
    x = logits.detach().float().requires_grad_()
    rows = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none")
    rows.backward(grad_loss.float())
    return rows.detach(), x.grad.to(logits.dtype)


def _check_against_float64(logits, labels, ignore_index=-100):
    n, v = logits.shape
    grad_loss = torch.rand(n, device=logits.device) + 0.5
    loss, lse = loss_ops._forward_native(logits, labels, ignore_index)
    grad = loss_ops._backward_native(grad_loss, logits, labels, lse, ignore_index)
    assert loss.dtype == lse.dtype == torch.float32 and grad.dtype == logits.dtype
    exact_loss, exact_lse, exact_grad = _exact(logits, labels, ignore_index, grad_loss)
    torch_loss, torch_grad = _torch_fp32(logits, labels, ignore_index, grad_loss)
    scale = logits.detach().double().abs().amax(dim=1) + math.log(max(v, 1)) + 1.0  # |terms| of lse − x[label]
    # fp32 roundings of the loss: at most 3x torch's own error, or a few roundings of its terms.
    floor = 8 * EPS32 * scale.max().item()
    assert max_error(loss, exact_loss) <= 3 * max_error(torch_loss, exact_loss) + floor
    valid = labels != ignore_index
    assert max_error(lse[valid], exact_lse[valid]) <= floor
    assert torch.equal(loss[~valid].cpu(), torch.zeros(int((~valid).sum()))), "ignored rows give 0"
    grad_floor = 8 * EPS32 * exact_grad.abs().max().item() + 16 * EPS32 * scale.max().item() * grad_loss.max().item()
    assert max_error(grad, exact_grad) <= 3 * max_error(torch_grad, exact_grad) + grad_floor
    assert torch.all(grad[~valid] == 0), "ignored rows take no gradient"
    return loss, lse, grad


@pytest.mark.parametrize("n,v", SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_each_cpu_isa_matches_float64(cpu_isa, dtype, n, v):
    logits = (torch.randn(n, v) * 4).to(dtype)
    labels = torch.randint(0, v, (n,))
    if n > 2:
        labels[1] = -100
    _check_against_float64(logits, labels)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_strided_rows_and_ignore_index(device, dtype):
    wide = (torch.randn(11, 300, device=device) * 3).to(dtype)
    logits = wide[:, 7:264]  # rows 300 elements apart, starting mid-row
    assert not logits.is_contiguous()
    labels = torch.randint(0, 257, (11,), device=device)
    labels[::3] = 5  # ignore_index 5 is also a class: rows labelled 5 are ignored, not scored
    _check_against_float64(logits, labels, ignore_index=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_extreme_logits(cpu_isa, dtype):
    v = 70
    logits = torch.randn(6, v).to(dtype)
    logits[0] *= 1e4  # a spread far past exp's range: only the max term counts
    logits[1, 3:40] = float("-inf")  # a masked vocabulary
    logits[2] += 1e4  # every logit large: the max is subtracted first
    logits[3] = -1e4 - logits[3].abs()
    labels = torch.tensor([5, 50, 7, 8, 9, 10])
    loss, lse, grad = _check_against_float64(logits, labels)
    assert torch.all(grad[1, 3:40] == 0), "exp(-inf) is exactly 0"
    assert torch.isfinite(loss).all()


def test_nan_and_inf_propagate_as_torch():
    logits = torch.randn(3, 40)
    logits[0, 17] = float("nan")
    logits[1, 2] = float("-inf")  # the label's own logit is -inf: an infinite loss
    labels = torch.tensor([3, 2, 4])
    loss, lse = loss_ops._forward_native(logits, labels, -100)
    expected = F.cross_entropy(logits, labels, reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(expected[0])
    assert loss[1] == float("inf") and expected[1] == float("inf")
    assert torch.isfinite(loss[2])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_name)
def test_functional_matches_torch(dtype, reduction):
    logits = (torch.randn(2, 9, 130) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, 130, (2, 9))
    labels[0, :4] = -100
    got = lowrank.cross_entropy(logits, labels, reduction=reduction)
    weights = torch.rand(2, 9, dtype=torch.float64)
    if reduction == "none":
        (got.double() * weights).sum().backward()
    else:
        got.backward()
    mine = logits.grad.clone()
    logits.grad = None
    x64 = logits.detach().double().requires_grad_()
    want = F.cross_entropy(x64.reshape(-1, 130), labels.reshape(-1), reduction=reduction)
    want = want.reshape(2, 9) if reduction == "none" else want
    if reduction == "none":
        (want * weights).sum().backward()
    else:
        want.backward()
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-5)
    assert torch.allclose(got.double(), want.detach(), rtol=tol, atol=tol)
    grad_tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 2 ** -8)
    assert torch.allclose(mine.double(), x64.grad, rtol=grad_tol, atol=grad_tol * x64.grad.abs().max().item())


def test_mean_over_no_labels_is_nan_as_torch():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.full((4,), -100)
    got = lowrank.cross_entropy(logits, labels)
    assert torch.isnan(got) and torch.isnan(F.cross_entropy(logits, labels))
    assert lowrank.cross_entropy(logits, labels, reduction="sum") == 0


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_empty_and_classless(device, dtype):
    logits = torch.randn(0, 50, device=device, dtype=dtype, requires_grad=True)
    got = lowrank.cross_entropy(logits, torch.zeros(0, dtype=torch.int64, device=device), reduction="sum")
    got.backward()
    assert got == 0 and logits.grad.shape == (0, 50)
    none = torch.randn(3, 0, device=device, dtype=dtype, requires_grad=True)
    rows = lowrank.cross_entropy(none, torch.full((3,), -100, device=device), reduction="none")
    assert torch.equal(rows.cpu(), torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [49152, -1, -101], ids=["too-large", "negative", "not-ignore"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_name)
def test_labels_outside_the_classes_are_refused(dtype, bad):
    logits = torch.randn(4, 49152, dtype=dtype)
    labels = torch.tensor([1, 2, bad, 3])
    with pytest.raises(ValueError, match=r"labels: .* at position 2 is not a class in \[0, 49152\)"):
        lowrank.cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="labels: .* at position 2"):  # the op (fp64: its reference)
        loss_ops.cross_entropy_forward(logits, labels, -100)
    if dtype != torch.float64:  # and the binding itself, which never trusts its caller
        with pytest.raises(ValueError, match="labels: .* at position 2"):
            _C.cross_entropy_cpu(*_matrices(logits, labels), -100, 1)


def _matrices(logits, labels):
    from lowrank._validate import matrix

    n = logits.shape[0]
    out = torch.empty(n), torch.empty(n)
    return matrix("logits", logits), matrix("labels", labels), matrix("loss", out[0]), matrix("lse", out[1])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels: expected dtype int64"),
        (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, r"labels: expected shape \[4\]"),
        (dict(logits=torch.zeros(4, 10, dtype=torch.int64)), TypeError, "logits: expected dtype"),
        (dict(logits=torch.tensor(1.0)), ValueError, "logits: expected at least 1 dimension"),
        (dict(reduction="avg"), ValueError, "reduction: expected one of mean, sum, none"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index: expected an int"),
        (dict(logits=[1.0, 2.0]), TypeError, "logits: expected a torch.Tensor"),
        (dict(labels=[1, 2, 3, 4]), TypeError, "labels: expected a torch.Tensor"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
    args = dict(logits=torch.randn(4, 10), labels=torch.randint(0, 10, (4,)), ignore_index=-100, reduction="mean")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lowrank.cross_entropy(**args)


def test_binding_refuses_mismatched_views():
    from lowrank._validate import matrix

    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    short = torch.empty(3)
    with pytest.raises(ValueError, match=r"loss: expected shape \[1, 4\]"):
        _C.cross_entropy_cpu(matrix("logits", logits), matrix("labels", labels), matrix("loss", short),
                             matrix("lse", torch.empty(4)), -100, 1)  # fmt: skip
    with pytest.raises(ValueError, match="labels: expected int64"):
        _C.cross_entropy_cpu(matrix("logits", logits), matrix("labels", labels.int()), matrix("loss", torch.empty(4)),
                             matrix("lse", torch.empty(4)), -100, 1)  # fmt: skip
    with pytest.raises(ValueError, match="grad: expected logits' dtype"):
        _C.cross_entropy_backward_cpu(matrix("grad", torch.empty(4, 10, dtype=torch.bfloat16)), matrix("logits", logits),
                                      matrix("labels", labels), matrix("lse", torch.empty(4)),
                                      matrix("grad_loss", torch.empty(4)), -100, 1)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The backward's reused gradient buffer never overwrites a gradient somebody holds
# ---------------------------------------------------------------------------------------------
def test_a_held_gradient_is_never_overwritten():
    v = 4096  # 128 rows x 4096 fp32: 2 MB, past the reuse threshold
    logits = torch.randn(128, v, requires_grad=True)
    labels = torch.randint(0, v, (128,))
    lowrank.cross_entropy(logits, labels).backward()
    first = logits.grad  # held by the leaf: the next backward must not reuse its memory
    kept = first.clone()
    logits.grad = None
    with torch.no_grad():
        logits.mul_(3)
    lowrank.cross_entropy(logits, labels).backward()
    assert torch.equal(first, kept)
    assert not torch.equal(logits.grad, kept)
    # Once nothing holds it, the storage is used again (so a training step allocates nothing new).
    del first
    second_ptr = logits.grad.data_ptr()
    logits.grad = None
    lowrank.cross_entropy(logits, labels).backward()
    assert logits.grad.data_ptr() == second_ptr
    hooked = []
    h = logits.register_hook(lambda g: hooked.append(g))
    logits.grad = None
    lowrank.cross_entropy(logits, labels).backward()
    h.remove()
    kept = hooked[0].clone()
    logits.grad = None
    lowrank.cross_entropy(logits * 2, labels).backward()
    assert torch.equal(hooked[0], kept), "a gradient kept by a hook is not reused"
    loss_ops.release_workspace()


# ---------------------------------------------------------------------------------------------
# torch.library: schema, fake kernels, autograd registration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_name)
def test_opcheck(dtype):
    logits = torch.randn(6, 37, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 37, (6,))
    labels[2] = -100
    torch.library.opcheck(torch.ops.lowrank.cross_entropy_forward, (logits, labels, -100))
    loss, lse = torch.ops.lowrank.cross_entropy_forward(logits.detach(), labels, -100)
    torch.library.opcheck(torch.ops.lowrank.cross_entropy_backward, (torch.rand(6, dtype=lse.dtype), logits.detach(), labels, lse, -100))


def test_gradcheck_float64():
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 10, 0, 4])
    assert torch.autograd.gradcheck(lambda x: torch.ops.lowrank.cross_entropy_forward(x, labels, -100)[0], (logits,))
    assert torch.autograd.gradcheck(lambda x: lowrank.cross_entropy(x, labels), (logits,))


def test_compiles():
    logits = torch.randn(8, 300, requires_grad=True)
    labels = torch.randint(0, 300, (8,))
    fn = torch.compile(lambda x, y: lowrank.cross_entropy(x, y), fullgraph=True, backend="aot_eager")
    got = fn(logits, labels)
    got.backward()
    want = F.cross_entropy(logits.detach(), labels)
    assert torch.allclose(got, want, rtol=1e-5)
    assert logits.grad is not None


# ---------------------------------------------------------------------------------------------
# transformers: causal_lm_loss against ForCausalLMLoss, fast_loss on whole models
# ---------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402


@pytest.mark.parametrize("items", [None, 7, "tensor"])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_causal_lm_loss_matches_transformers(dtype, shifted, items):
    v = 301
    logits = (torch.randn(3, 10, v) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (3, 10))
    labels[1, :3] = -100
    kwargs = dict(num_items_in_batch=torch.tensor(7) if items == "tensor" else items)
    if shifted:
        kwargs["shift_labels"] = torch.randint(0, v, (3, 10))
    mine = lowrank.causal_lm_loss(logits, labels, v, **kwargs)
    mine.backward()
    g_mine = logits.grad.clone()
    logits.grad = None
    theirs = ForCausalLMLoss(logits, labels, v, **kwargs)
    theirs.backward()
    assert mine.dtype == theirs.dtype == torch.float32
    assert torch.allclose(mine, theirs, rtol=2e-6, atol=1e-6)
    ulp = 2**-8 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(g_mine.double(), logits.grad.double(), rtol=ulp, atol=ulp * logits.grad.abs().max().item())


def _tiny(arch: str, dtype=torch.float32):
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=517, tie_word_embeddings=True)  # fmt: skip
        return transformers.LlamaForCausalLM(cfg).to(dtype)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=517, bos_token_id=0, eos_token_id=1,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_fast_loss_trains_the_same_model(arch, dtype):
    model = lowrank.inject(_tiny(arch, dtype), lowrank.LoRAConfig(r=4, target_modules="all-linear"))
    for p in model.parameters():  # nonzero B: the adapters take part
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    fast = lowrank.fast_loss(copy.deepcopy(model))
    ids = torch.randint(0, 517, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    out_fast, out_plain = fast(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert torch.equal(out_fast.logits, out_plain.logits), "the outputs keep their logits"
    assert torch.allclose(out_fast.loss, out_plain.loss, rtol=1e-5, atol=1e-6)
    out_fast.loss.backward()
    out_plain.loss.backward()
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in fast.named_parameters():
        if p.requires_grad:
            ref = grads[n].double()
            assert (p.grad.double() - ref).abs().max() <= tol * ref.abs().max() + 1e-9, n
    assert lowrank.fast_loss(fast, enabled=False) is fast
    assert fast.loss_function is ForCausalLMLoss


def test_fast_loss_refuses_other_models():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        lowrank.fast_loss("llama")
    with pytest.raises(ValueError, match="has no transformers loss_function"):
        lowrank.fast_loss(torch.nn.Linear(3, 3))
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, num_labels=3, pad_token_id=0)  # fmt: skip
    classifier = transformers.LlamaForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="not a causal language model's cross-entropy"):
        lowrank.fast_loss(classifier)
    custom = _tiny("llama")
    custom.loss_function = lambda *a, **k: 0
    with pytest.raises(ValueError, match="its loss_function was set"):
        lowrank.fast_loss(custom)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and lowrank's CUDA kernels")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
def test_cuda_matches_float64(dtype):
    for n, v in SHAPES:
        logits = (torch.randn(n, v, device="cuda") * 4).to(dtype)
        labels = torch.randint(0, v, (n,), device="cuda")
        _check_against_float64(logits, labels)
    with pytest.raises(ValueError, match="labels"):
        lowrank.cross_entropy(torch.randn(2, 5, device="cuda"), torch.tensor([0, 5], device="cuda"))


# ---------------------------------------------------------------------------------------------
# fast_loss(model, keep_logits=False): the output head fused into the loss
# ---------------------------------------------------------------------------------------------
def _head_reference(hidden, weight, bias, labels, ignore_index, scale, dtype):
    """The unfused head and loss as transformers runs them: logits in ``dtype`` (float64 for the exact
    answer), the loss in fp32 or wider from them, and its gradients."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    logits = h @ w.t() + (0 if b is None else b)
    wide = logits.double() if dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(wide, labels, ignore_index=ignore_index, reduction="sum") * scale
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double(), None if b is None else b.grad.double()


@pytest.mark.parametrize("chunk_bytes", [1 << 10, 16 << 20], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_name)
def test_head_loss_matches_the_unfused_head(dtype, with_bias, chunk_bytes, monkeypatch):
    monkeypatch.setattr(lowrank.loss, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(lowrank.loss, "_MIN_CHUNK_ROWS", 1)
    n, d, v = 37, 24, 301
    hidden = torch.randn(n, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) / 4).to(dtype).requires_grad_()
    bias = torch.randn(v).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, v, (n,))
    labels[::5] = -100
    scale = 1.0 / int((labels != -100).sum())
    got = lowrank.loss.HeadLossFunction.apply(hidden, weight, bias, labels, -100, scale)
    (got * 3).backward()  # the backward scales by the incoming gradient
    # Against the unfused head in the same dtype (the same roundings: bf16 logits, bf16 gradient GEMMs),
    # and against float64 within what those roundings allow.
    same = _head_reference(hidden, weight, bias, labels, -100, scale, dtype)
    exact = _head_reference(hidden, weight, bias, labels, -100, scale, torch.float64)
    ulp = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}[dtype]
    grads = (hidden.grad, weight.grad, None if bias is None else bias.grad)
    assert abs(got.item() - same[0].item()) <= 64 * 2.0**-23 * abs(same[0].item())  # fp32 sums in another order
    assert abs(got.item() - exact[0].item()) <= 64 * max(ulp, 2.0**-23) * abs(exact[0].item()) * (1 + 4 * (dtype == torch.bfloat16))
    rows = max(1, min(n, chunk_bytes // (v * hidden.element_size())))
    chunks = -(-n // rows)
    acc_ulp = 2.0**-52 if dtype == torch.float64 else 2.0**-23  # W's and bias's gradients sum chunks in fp32
    for name, g, ref, ex in zip(("hidden", "weight", "bias"), grads, same[1:], exact[1:]):
        if ref is None:
            continue
        assert g.dtype == dtype, name
        # bf16: 2 roundings of the largest gradient (the GEMMs sum in another order); fp32/fp64: 8, as the
        # logits' gradient itself differs by a few (another exp and log than torch's); for W and bias one
        # more fp32 rounding per chunk
        allowed = (2 if dtype == torch.bfloat16 else 8) * ulp + (chunks * acc_ulp if name != "hidden" else 0.0)
        assert (g.double() - 3 * ref).abs().max() <= allowed * (3 * ref).abs().max(), name
        assert (g.double() - 3 * ex).abs().max() <= 16 * max(ulp, 2.0**-23) * (3 * ex).abs().max(), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_fused_head_trains_the_same_model(arch, dtype, monkeypatch):
    monkeypatch.setattr(lowrank.loss, "_CHUNK_BYTES", 4096)  # several chunks even on the tiny model
    monkeypatch.setattr(lowrank.loss, "_MIN_CHUNK_ROWS", 1)
    model = lowrank.inject(_tiny(arch, dtype), lowrank.LoRAConfig(r=4, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    fused = lowrank.fast_loss(copy.deepcopy(model), keep_logits=False)
    ids = torch.randint(0, 517, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(9)}):
        out_fused, out_plain = fused(input_ids=ids, labels=labels, **kwargs), model(input_ids=ids, labels=labels, **kwargs)
        assert out_fused.logits is None, "a fused training forward keeps no logits"
        tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(out_fused.loss, out_plain.loss, rtol=tol, atol=1e-6)
        out_fused.loss.backward()
        out_plain.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for n, p in fused.named_parameters():
            if p.requires_grad:
                ref = grads[n].double()
                assert (p.grad.double() - ref).abs().max() <= 2 * tol * ref.abs().max() + 1e-9, n
        model.zero_grad(set_to_none=True)
        fused.zero_grad(set_to_none=True)
    with torch.no_grad():  # any other forward is the plain head's
        assert torch.equal(fused(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits)
    fused.eval()
    assert torch.equal(fused(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert type(fused.get_output_embeddings()) is not torch.nn.Linear
    assert "lm_head.weight" in fused.state_dict() or "transformer.wte.weight" in fused.state_dict()
    lowrank.fast_loss(fused, enabled=False)
    assert type(fused.get_output_embeddings()) is lowrank.FrozenLinear  # the class inject gave it
    assert not fused._forward_pre_hooks and not fused._forward_hooks
    assert fused.loss_function is ForCausalLMLoss


@pytest.mark.parametrize("inject_first", [True, False])
def test_fused_head_and_inject_in_either_order(inject_first, monkeypatch):
    """``fast_loss(keep_logits=False)`` and ``inject`` both change the head's class: in either order the
    head's eval forward is the frozen head's (the row kernel for a few tokens without gradients, pinned
    here: no torch GEMM runs for it), ``fast_loss(enabled=False)`` gives back the class ``inject`` made,
    and ``merge_and_unload`` leaves a plain ``nn.Linear`` once the fused head is undone."""
    monkeypatch.setattr(lowrank.ops._runtime, "CPU_ROWS_MAX_M", {torch.float32: 1 << 20})
    model = _tiny("llama")
    config = lowrank.LoRAConfig(r=4, target_modules="all-linear")
    if inject_first:
        lowrank.fast_loss(lowrank.inject(model, config), keep_logits=False)
    else:
        lowrank.inject(lowrank.fast_loss(model, keep_logits=False), config)
    head = model.get_output_embeddings()
    assert type(head) is lowrank.loss._StandInHead and head._unfused_class is lowrank.FrozenLinear
    ids = torch.randint(0, 517, (3, 7))
    labels = ids.clone()
    assert model.train()(input_ids=ids, labels=labels).logits is None
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
        hidden = model.model(input_ids=ids).last_hidden_state
        calls, _ = aten_calls(lambda: head(hidden))
    assert not [op for op, _ in calls if op in GEMM_OPS], calls
    expected = hidden.double() @ head.weight.double().t()
    assert (logits.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    lowrank.merge_and_unload(model)
    assert type(head) is lowrank.loss._StandInHead and head._unfused_class is torch.nn.Linear
    lowrank.fast_loss(model, enabled=False)
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_fused_head_with_a_trainable_head():
    model = _tiny("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    fused = lowrank.fast_loss(copy.deepcopy(model).train(), keep_logits=False)
    ids = torch.randint(0, 517, (3, 9))
    fused(input_ids=ids, labels=ids).loss.backward()
    model.train()(input_ids=ids, labels=ids).loss.backward()
    ref = model.lm_head.weight.grad
    assert (fused.lm_head.weight.grad - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fused_head_refuses_what_it_cannot_do():
    model = lowrank.fast_loss(_tiny("llama").train(), keep_logits=False)
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out * 2.0)  # a soft cap of sorts
    ids = torch.randint(0, 517, (1, 6))
    with pytest.raises(RuntimeError, match="changes its logits between the output head and the loss"):
        model(input_ids=ids, labels=ids)
    handle.remove()
    assert model(input_ids=ids, labels=ids).loss.isfinite()  # the state did not stick
    other = _tiny("llama")
    other.lm_head = torch.nn.Sequential(torch.nn.Linear(64, 517))
    with pytest.raises(ValueError, match="keep_logits: the fused head needs an nn.Linear"):
        lowrank.fast_loss(other, keep_logits=False)


# ---------------------------------------------------------------------------------------------
# lowrank.linear_cross_entropy: the public fused head and loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_linear_cross_entropy_matches_head_then_loss(dtype, with_bias, reduction, monkeypatch):
    """F.cross_entropy(F.linear(hidden, W, b).float(), labels) on [B, T, H] hidden states with ignored
    labels, over several chunks, against float64: the loss and the gradients of hidden, W and b."""
    monkeypatch.setattr(lowrank.loss, "_CHUNK_BYTES", 2048)
    monkeypatch.setattr(lowrank.loss, "_MIN_CHUNK_ROWS", 1)
    torch.manual_seed(11)
    b, t, d, v = 3, 7, 20, 131
    hidden = torch.randn(b, t, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) / 3).to(dtype).requires_grad_()
    bias = torch.randn(v).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, v, (b, t))
    labels[:, ::3] = -100
    got = lowrank.linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)
    assert got.dtype == torch.float32 and got.shape == ()
    (got * 2).backward()
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bb = None if bias is None else bias.detach().double().requires_grad_()
    want = F.cross_entropy(F.linear(h, w, bb).reshape(-1, v), labels.reshape(-1), reduction=reduction)
    (want * 2).backward()
    # fp32: sums in fp32 (worst of 20 seeds: loss 1e-7, gradients 6e-7 of their largest). bf16: the logits,
    # the logits' gradient and the gradients themselves each rounded to bf16 (worst of 20 seeds: loss
    # 3.6e-4; gradients 9.3e-3 of their largest, the bias's sums of rounded terms cancelling most)
    bf16 = dtype == torch.bfloat16
    loss_bound, grad_bound = (2.0**-9, 2.0**-5) if bf16 else (2.0**-20, 2.0**-18)
    assert abs(got.item() - want.item()) <= loss_bound * abs(want.item())
    for name, g, ref in (("hidden", hidden.grad, h.grad), ("weight", weight.grad, w.grad),
                         ("bias", None if bias is None else bias.grad, None if bb is None else bb.grad)):  # fmt: skip
        if ref is None:
            continue
        assert g.dtype == dtype and g.shape == ref.shape, name
        assert (g.double() - ref).abs().max() <= grad_bound * ref.abs().max(), name


def test_linear_cross_entropy_without_gradients_and_edge_cases():
    torch.manual_seed(12)
    hidden, weight = torch.randn(9, 8), torch.randn(50, 8)
    labels = torch.randint(0, 50, (9,))
    want = F.cross_entropy(F.linear(hidden.double(), weight.double()), labels)
    with torch.no_grad():
        got = lowrank.linear_cross_entropy(hidden, weight, labels)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    # every label ignored: the mean is NaN (as torch's), the sum 0
    none = torch.full((9,), -100)
    assert math.isnan(lowrank.linear_cross_entropy(hidden, weight, none).item())
    assert lowrank.linear_cross_entropy(hidden, weight, none, reduction="sum").item() == 0.0
    # a custom ignore_index
    labels2 = labels.clone()
    labels2[:4] = 7777
    want2 = F.cross_entropy(F.linear(hidden.double(), weight.double()), labels2, ignore_index=7777)
    got2 = lowrank.linear_cross_entropy(hidden, weight, labels2, ignore_index=7777)
    assert abs(got2.item() - want2.item()) <= 1e-5 * abs(want2.item())


def test_linear_cross_entropy_bad_input_names_the_argument():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    cases = [
        (dict(hidden=hidden.numpy()), TypeError, "hidden: expected a torch.Tensor"),
        (dict(hidden=hidden.long()), TypeError, "hidden: expected a floating-point"),
        (dict(weight=weight.double()), TypeError, "weight: expected dtype"),
        (dict(weight=torch.randn(10, 9)), ValueError, r"weight: expected \[classes, 8\]"),
        (dict(bias=torch.randn(11)), ValueError, r"bias: expected shape \[10\]"),
        (dict(labels=labels.int()), TypeError, "labels: expected dtype"),
        (dict(labels=labels[:3]), ValueError, r"labels: expected shape \[4\]"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels: 10 at position 2"),
        (dict(reduction="none"), ValueError, "reduction: expected 'mean' or 'sum'"),
    ]
    for change, kind, match in cases:
        args = dict(hidden=hidden, weight=weight, labels=labels, bias=None, reduction="mean") | change
        with pytest.raises(kind, match=match):
            lowrank.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], bias=args["bias"],
                                         reduction=args["reduction"])  # fmt: skip
