"""lowrank._validate: the safety boundary between tensors and raw kernel pointers."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lowrank import _C
from lowrank._validate import check_tensor, last_dim_contiguous, matrix


def test_matrix_of_contiguous_and_sliced_views():
    t = torch.randn(6, 10)
    m = matrix("w", t)
    assert (m.rows, m.cols, m.ld, m.dtype, m.device) == (6, 10, 10, _C.DType.float32, -1)
    s = t[1:5, 2:9]  # offset slice: leading dimension is the parent's row stride, no copy
    m = matrix("w", s)
    assert (m.rows, m.cols, m.ld) == (4, 7, 10)
    row = matrix("bias", torch.randn(5, dtype=torch.bfloat16))
    assert (row.rows, row.cols, row.dtype) == (1, 5, _C.DType.bfloat16)
    assert matrix("x", torch.randn(0, 3)).rows == 0


def _keeps_alive(make_view, make_copy) -> bool:
    """Whether the view ``make_view`` builds of a fresh ``make_copy()`` (nothing else holds it) keeps the
    copy alive; the view, once dropped, must let it go either way."""
    copy = make_copy()
    ref = weakref.ref(copy)
    view = make_view(copy)
    del copy
    gc.collect()
    held = ref() is not None
    del view
    gc.collect()
    assert ref() is None
    return held


def test_views_hold_their_tensors():
    """A kernel view of a temporary (a contiguous copy made for one kernel call) keeps the copy alive while
    the view lives, so its memory cannot go to the next temporary before the kernel reads it: Matrix, and
    attention's 4-D views. A Matrix made with ``hold=False`` (cached between calls, keyed by address) does
    not keep a replaced tensor alive."""
    from lowrank.attention import _view

    rows = lambda: torch.randn(8, 5).t().contiguous()  # noqa: E731
    assert _keeps_alive(lambda t: matrix("x", t), rows)
    assert not _keeps_alive(lambda t: matrix("x", t, hold=False), rows)
    assert _keeps_alive(_view, lambda: torch.randn(2, 3, 4, 5).transpose(1, 2).contiguous())


def test_matrix_rejects_non_contiguous_last_dim():
    with pytest.raises(ValueError, match=r"^w: .*last dimension must be contiguous"):
        matrix("w", torch.randn(5, 6).t())
    with pytest.raises(ValueError, match=r"^bias: .*contiguous"):
        matrix("bias", torch.randn(10)[::2])


def test_matrix_rejects_3d():
    with pytest.raises(ValueError, match=r"^x: expected 1 or 2 dimensions, got 3"):
        matrix("x", torch.randn(2, 3, 4))


def test_matrix_rejects_wrong_dtype_with_type_error():
    with pytest.raises(TypeError, match=r"^lora_a: expected dtype .*got float64"):
        matrix("lora_a", torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^x: expected dtype float32, got bfloat16"):
        matrix("x", torch.randn(3, 4, dtype=torch.bfloat16), dtypes=(torch.float32,))
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got list"):
        matrix("x", [[1.0]])


def test_matrix_rejects_overlapping_rows():
    t = torch.randn(20).as_strided((4, 5), (2, 1))  # rows overlap: row stride 2 < 5 columns
    with pytest.raises(ValueError, match=r"^w: row stride 2 is smaller than the row length 5"):
        matrix("w", t)


def test_matrix_rejects_other_devices():
    with pytest.raises(ValueError, match=r"^x: .*cpu or cuda"):
        matrix("x", torch.empty(3, 4, device="meta"))


def test_check_tensor_messages():
    with pytest.raises(ValueError, match=r"^u: expected shape \[\*, 3\], got \[4, 2\]"):
        check_tensor("u", torch.randn(4, 2), shape=(None, 3))
    with pytest.raises(ValueError, match=r"^w: expected 2 dimensions, got 1"):
        check_tensor("w", torch.randn(4), ndim=2)
    with pytest.raises(ValueError, match=r"^b: expected a tensor on meta"):
        check_tensor("b", torch.randn(4), device="meta")


def test_last_dim_contiguous():
    t = torch.randn(4, 6)
    assert last_dim_contiguous(t) is t
    s = t[:, 1:4]
    assert last_dim_contiguous(s) is s  # 2-D with stride-1 rows: handed over as is
    tt = t.t()
    c = last_dim_contiguous(tt)
    assert c is not tt and c.is_contiguous() and torch.equal(c, tt)
