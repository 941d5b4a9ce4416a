"""Causal grouped-query attention on lowrank's CPU kernels (lowrank/attention.py, csrc/cpu/attention.cpp)
against a float64 reference on fresh random inputs and odd shapes (head dimensions that are not a whole
vector, query blocks with a remainder, decode's single query over many keys, query heads sharing key
heads), forward and backward, every CPU kernel variant; bad input; and ``fast_attention`` on a
transformers model against its own SDPA path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank import _C
from lowrank.attention import attention_forward, causal_attention, fast_attention, transformers_attention

from conftest import count_calls, dtype_name

transformers = pytest.importorskip("transformers")

SHAPES = [  # B, H, KV, T, S, D
    (1, 1, 1, 1, 1, 1),
    (2, 6, 3, 7, 7, 24),
    (1, 4, 1, 1, 9, 16),  # decode: one query sees every key
    (1, 2, 1, 3, 50, 40),  # few query rows (read where they lie), a head dimension of 2.5 vectors
    (1, 2, 1, 8, 12, 8),  # the first count of query rows that takes the blocked path
    (2, 3, 3, 33, 40, 5),  # more keys than queries: bottom-right causal
    (1, 2, 2, 70, 70, 64),  # a remainder of the 32-row query blocks
    (1, 9, 3, 65, 65, 80),
]


def reference(q, k, v, scale, key_ranges=None):
    """float64 softmax(scale · Q Kᵀ + mask) V, key j visible to query i when j <= i + S - T (and, with
    ``key_ranges``, start_b <= j < end_b; a row that sees no key is 0, as torch's SDPA)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    t, s = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    hidden = torch.arange(s)[None, :] > torch.arange(t)[:, None] + (s - t)
    if key_ranges is not None:
        keys = torch.arange(s)
        outside = (keys < key_ranges[:, :1]) | (keys >= key_ranges[:, 1:])
        hidden = hidden[None, None] | outside[:, None, None, :]
    p = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1)
    return torch.nan_to_num(p, nan=0.0) @ v  # (softmax of a row of −inf is NaN: no key, a zero row)


def assert_rounded_once(name, got, exact, dtype):
    """fp32 sums (a few fp32 roundings of the largest value), then one rounding to ``dtype``: at most half
    an ulp of the exact value (bf16: 2^-9 relative) on top."""
    assert got.dtype == dtype and got.shape == exact.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite (an element the kernel did not write?)"
    err = (got.double() - exact).abs()
    scale = exact.abs().max().item()
    sums = 2e-6 * scale
    allowed = sums + (exact.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0.0)
    worst = (err - allowed).max().item()
    assert worst <= 0, f"{name}: error {err.max().item():.3g} over the bound by {worst:.3g} (scale {scale:.3g})"


def _inputs(b, h, kv, t, s, d, dtype, transposed_query=True):
    q = torch.randn(b, t, h, d).to(dtype).transpose(1, 2) if transposed_query else torch.randn(b, h, t, d).to(dtype)
    k = torch.randn(b, kv, s, d).to(dtype)
    v = torch.randn(b, kv, s, d).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_float64(shape, dtype, cpu_isa):
    b, h, kv, t, s, d = shape
    q, k, v = (x.requires_grad_(True) for x in _inputs(b, h, kv, t, s, d, dtype))
    scale = 0.7 * d**-0.5
    out = causal_attention(q, k, v, scale)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = reference(q64, k64, v64, scale)
    exact = torch.autograd.grad(want, (q64, k64, v64), grad.double())
    assert out.shape == (b, h, t, d) and out.transpose(1, 2).is_contiguous()
    assert_rounded_once("out", out, want.detach(), dtype)
    for name, g, e in zip(("grad_query", "grad_key", "grad_value"), got, exact):
        assert_rounded_once(name, g, e, dtype)


PADDED = [  # B, H, KV, T, S, D, key ranges [start, end)
    (3, 2, 1, 7, 7, 16, [[0, 7], [0, 1], [0, 4]]),  # right padding: unpadded, only the first key, pad queries
    (2, 6, 3, 40, 40, 24, [[0, 33], [0, 17]]),  # whole query blocks past the keys, a block remainder
    (3, 2, 1, 40, 40, 24, [[5, 40], [37, 40], [0, 40]]),  # left padding: pad queries that see no key
    (2, 2, 2, 9, 9, 8, [[2, 6], [9, 9]]),  # both sides; a sequence that is all padding
    (2, 4, 2, 3, 20, 8, [[0, 11], [18, 20]]),  # few query rows, more keys than queries, one row with no key
    (2, 2, 2, 1, 9, 40, [[0, 5], [4, 9]]),  # decode: right padding, left padding
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("shape", PADDED, ids=str)
def test_key_ranges_match_float64(shape, dtype, cpu_isa):
    """A padded batch: batch b's keys outside [start, end) hidden from every query (right padding's pad
    queries see the real keys; left padding's see none and get zeros, as SDPA gives them). Against
    float64, forward and backward: the hidden keys' gradients are exactly 0."""
    b, h, kv, t, s, d, ranges = shape
    ranges = torch.tensor(ranges)
    q, k, v = (x.requires_grad_(True) for x in _inputs(b, h, kv, t, s, d, dtype))
    scale = 0.6 * d**-0.5
    out = causal_attention(q, k, v, scale, key_ranges=ranges)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = reference(q64, k64, v64, scale, ranges)
    exact = torch.autograd.grad(want, (q64, k64, v64), grad.double())
    assert_rounded_once("out", out, want.detach(), dtype)
    for name, g, e in zip(("grad_query", "grad_key", "grad_value"), got, exact):
        assert_rounded_once(name, g, e, dtype)
    for i, (lo, hi) in enumerate(ranges.tolist()):
        for grad_kv in got[1:]:
            assert (grad_kv[i, :, :lo] == 0).all() and (grad_kv[i, :, hi:] == 0).all()
    with torch.no_grad():  # the no-Function path passes them too
        assert torch.equal(causal_attention(q, k, v, scale, key_ranges=ranges), out.detach())


def test_key_ranges_bad_input_names_the_argument():
    q, k, v = _inputs(2, 4, 2, 5, 8, 16, torch.float32)
    for ranges, kind, match in [
        (torch.tensor([[0, 8], [0, 3]], dtype=torch.int32), TypeError, "^key_ranges: expected dtype int64"),
        (torch.tensor([8, 3]), ValueError, r"^key_ranges: expected shape \[2, 2\]"),
        (torch.tensor([[0, 0], [8, 3]]).t(), ValueError, "^key_ranges: expected a contiguous tensor"),
        (torch.tensor([[0, 8], [4, 3]]), ValueError, r"^key_ranges: \[4, 3\) at batch 1, expected 0 <= start <= end <= 8"),
        (torch.tensor([[0, 9], [0, 3]]), ValueError, r"^key_ranges: \[0, 9\) at batch 0"),
        (torch.tensor([[-1, 2], [0, 3]]), ValueError, r"^key_ranges: \[-1, 2\) at batch 0"),
    ]:
        with pytest.raises(kind, match=match):
            attention_forward(q, k, v, 0.25, ranges)


def test_lse_is_the_log_sum_exp_of_each_row():
    q, k, v = _inputs(2, 4, 2, 5, 8, 16, torch.float32)
    _, lse = attention_forward(q, k, v, 0.25)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    hidden = torch.arange(8)[None, :] > torch.arange(5)[:, None] + 3
    want = torch.logsumexp(scores.masked_fill(hidden, float("-inf")), -1)
    assert lse.dtype == torch.float32 and torch.allclose(lse.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_thread_count_does_not_change_the_bits(dtype):
    """Each task owns whole heads (forward) or whole key/value heads (backward)."""
    q, k, v = (x.requires_grad_(True) for x in _inputs(3, 6, 2, 40, 40, 32, dtype))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = causal_attention(q, k, v)
            runs.append([out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_matches_torch_sdpa():
    q, k, v = _inputs(2, 6, 3, 19, 19, 32, torch.float32)
    got = causal_attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v: (q.double(), k, v), "^query: expected dtype float32, bfloat16, got float64"),
    (lambda q, k, v: (q, k.bfloat16(), v), "^key: expected dtype float32, got bfloat16"),
    (lambda q, k, v: (q, k, v[:, :, :-1]), r"^value: expected shape \[2, 2, 8, 16\]"),
    (lambda q, k, v: (q[0], k, v), "^query: expected 4 dimensions, got 3"),
    (lambda q, k, v: (q[:, :3], k, v), "^key: 2 key/value heads do not divide the 3 query heads"),
    (lambda q, k, v: (torch.randn(2, 4, 9, 16), k, v), "^query: 9 positions, more than the 8 keys"),
    (lambda q, k, v: (q[..., :8], k, v), r"^key: expected shape \[2, \*, \*, 8\]"),
    (lambda q, k, v: (q[:, :, :0], k, v), "^query, key: every size must be positive"),
], ids=["dtype", "key-dtype", "value-shape", "dims", "heads", "too-many-queries", "head-dim", "empty"])  # fmt: skip
def test_bad_input_names_the_argument(change, match):
    q, k, v = _inputs(2, 4, 2, 5, 8, 16, torch.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        attention_forward(*change(q, k, v), 0.25)
    with pytest.raises(ValueError, match="^scale: expected a positive number"):
        attention_forward(q, k, v, 0.0)
    with pytest.raises(ValueError, match="^query: head dimension 300 above 256"):
        attention_forward(*_inputs(1, 1, 1, 2, 2, 300, torch.float32), 0.1)


def test_c_entry_point_checks_sizes():
    q, k, v = _inputs(1, 2, 1, 3, 3, 8, torch.float32)
    view = lowrank.attention._view
    lse = torch.empty(1, 2, 3)
    with pytest.raises(ValueError, match="^key: 2 key/value heads do not divide 3 query heads"):
        _C.attention_cpu(view(q), view(k), view(v), view(q.clone()), lse.data_ptr(), [1, 3, 2, 3, 3, 8], 1.0, 1)
    with pytest.raises(ValueError, match="^sizes: expected"):
        _C.attention_cpu(view(q), view(k), view(v), view(q.clone()), lse.data_ptr(), [1, 2, 1], 1.0, 1)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1, tie_word_embeddings=True)  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _ids(shape=(2, 9), seed=3):
    return torch.randint(2, 97, shape, generator=torch.Generator().manual_seed(seed))


def _lora_llamas(dtype):
    """(base, mine): a Llama with LoRA adapters that matter (B nonzero) on SDPA, and a copy of it on
    fast_attention."""
    base = lowrank.inject(_llama(dtype), lowrank.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return base, fast_attention(copy.deepcopy(base))


def _assert_same_training(mine, base, dtype, **batch):
    """The same training loss and adapter gradients from ``batch`` (within fp32 sums and the dtype)."""
    losses, grads = [], []
    for model in (mine.train(), base.train()):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append([p.grad.float() for p in model.parameters() if p.requires_grad])
    bf16 = dtype == torch.bfloat16
    assert torch.allclose(losses[0], losses[1], rtol=2e-2 if bf16 else 1e-5, atol=2e-2 if bf16 else 1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=5e-2 if bf16 else 1e-4, atol=5e-3 if bf16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_fast_attention_on_a_transformers_model(dtype, monkeypatch):
    """The same logits and gradients as transformers' SDPA path (within fp32 sums and the model's
    rounding), the same greedy tokens, every attention call on the kernel; ``enabled=False`` undoes it."""
    base, mine = _lora_llamas(dtype)
    calls = []
    original = lowrank.attention.attention_forward

    def spy(query, *args):
        calls.append(query.shape)
        return original(query, *args)

    monkeypatch.setattr(lowrank.attention, "attention_forward", spy)
    ids = _ids()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(mine(input_ids=ids).logits.float(), base(input_ids=ids).logits.float(), **tol)
        assert len(calls) == 2  # both layers
        assert torch.equal(mine.generate(ids[:1], max_new_tokens=5, do_sample=False),
                           base.generate(ids[:1], max_new_tokens=5, do_sample=False))  # fmt: skip
    assert any(shape[2] == 1 for shape in calls)  # decode steps ran on the kernel too
    _assert_same_training(mine, base, dtype, input_ids=ids, labels=ids)
    fast_attention(mine, enabled=False)
    assert mine.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_fast_attention_takes_right_padded_batches(dtype, monkeypatch):
    """A right-padded batch's mask runs on the kernel, as per-batch key ranges: the logits (pad positions
    too), the loss and its gradients of transformers' SDPA path on the same mask."""
    base, mine = _lora_llamas(dtype)
    used = []
    original = lowrank.attention.attention_forward
    monkeypatch.setattr(lowrank.attention, "attention_forward", lambda *a: used.append(a[-1]) or original(*a))
    ids = _ids((3, 11))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 1:] = 0  # one real token
    labels = ids.masked_fill(mask == 0, -100)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        got = mine(input_ids=ids, attention_mask=mask).logits.float()
        assert torch.allclose(got, base(input_ids=ids, attention_mask=mask).logits.float(), **tol)
    assert len(used) == 2 and all(torch.equal(r, torch.tensor([[0, 6], [0, 11], [0, 1]])) for r in used)
    _assert_same_training(mine, base, dtype, input_ids=ids, attention_mask=mask, labels=labels)


def test_fast_attention_generates_left_padded_batches(monkeypatch):
    """Batched generation pads on the left: prefill (pad queries that see no key) and every decode step
    run on the kernel, and give transformers' SDPA path's logits and greedy tokens."""
    base = _llama()
    mine = fast_attention(copy.deepcopy(base))
    used = []
    original = lowrank.attention.attention_forward
    monkeypatch.setattr(lowrank.attention, "attention_forward", lambda *a: used.append(a[-1]) or original(*a))
    ids = _ids((3, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :7] = 0  # one real token
    with torch.no_grad():
        got = mine(input_ids=ids, attention_mask=mask).logits
        want = base(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert torch.allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
        assert torch.equal(used[0], torch.tensor([[3, 8], [0, 8], [7, 8]]))
        used.clear()
        gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=1)
        assert torch.equal(mine.generate(ids, **gen), base.generate(ids, **gen))
        assert used and all(r is not None for r in used)  # every call on the kernel, with ranges
        # A static cache: its prefill's mask is top-left causal over the whole cache (SDPA's); each decode
        # step's is a range of the cache (the kernel's)
        used.clear()
        gen["cache_implementation"] = "static"
        assert torch.equal(mine.generate(ids, **gen), base.generate(ids, **gen))
        assert len(used) == 2 * 4  # 2 layers x the 4 decode steps after the prefill


def test_padding_key_ranges_reads_only_padding():
    from lowrank.attention import padding_key_ranges
    from transformers.masking_utils import sdpa_mask

    def mask_of(attention_mask, t=6, s=6):
        return sdpa_mask(batch_size=attention_mask.shape[0], q_length=t, kv_length=s, q_offset=s - t,
                         attention_mask=attention_mask.bool(), allow_is_causal_skip=False)  # fmt: skip

    padded = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0],
                           [0, 0, 0, 0, 0, 0]])  # fmt: skip
    m = mask_of(padded)
    found = padding_key_ranges(m, 6, 6)
    assert torch.equal(found, torch.tensor([[0, 4], [0, 6], [2, 6], [1, 4], [0, 0]]))
    assert padding_key_ranges(m, 6, 6) is found  # read once per mask
    m[1, 0, 5, 2] = False  # changed in place: read again, and no longer a range
    assert padding_key_ranges(m, 6, 6) is None
    assert padding_key_ranges(mask_of(torch.tensor([[1, 0, 1, 1, 1, 1]])), 6, 6) is None  # a hole
    assert torch.equal(padding_key_ranges(mask_of(padded[2:3], t=1), 1, 6), torch.tensor([[2, 6]]))  # decode
    assert padding_key_ranges(mask_of(padded)[:, :, :5], 5, 6) is None  # the wrong query count
    assert padding_key_ranges(mask_of(padded).float(), 6, 6) is None  # not a bool mask
    assert padding_key_ranges(torch.ones(2, 1, 6, 6, dtype=torch.bool), 6, 6) is None  # bidirectional


def test_fast_attention_leaves_masked_calls_to_sdpa(monkeypatch):
    """A mask that is not a padded batch's (a hole in a sequence here) goes to transformers' SDPA
    function, unchanged."""
    model = fast_attention(_llama())
    sdpa = fast_attention(_llama(), enabled=False)
    used = count_calls(monkeypatch, lowrank.attention, "attention_forward")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 3] = 0  # a hole
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, sdpa(input_ids=ids, attention_mask=mask).logits)
    assert not used


def test_transformers_attention_falls_back_where_it_does_not_apply():
    """Dropout in training, a non-causal module, an explicit mask: transformers' SDPA function answers."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 2
    q, k, v = _inputs(1, 4, 2, 6, 6, 8, torch.float32, transposed_query=False)
    got, _ = transformers_attention(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(got, want)  # bidirectional: not ours
    module.is_causal = True
    got, _ = transformers_attention(module, q, k, v, None)
    assert torch.allclose(got, causal_attention(q, k, v).transpose(1, 2)) and got.is_contiguous()


def test_fast_attention_refuses_a_plain_module():
    with pytest.raises(TypeError, match="^model: expected a transformers PreTrainedModel, got Linear"):
        fast_attention(torch.nn.Linear(2, 2))
