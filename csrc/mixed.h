// Mixed-adapter batches: one pass over the base weight for a batch whose rows use different adapters
// (csrc/cpu/mixed.cpp, csrc/cuda/mixed.cu).
//
//   out[m, :] = c[m, :] + x[m] Wᵀ + bias + T_a(m)(x_a[m])                     (fp32 accumulation)
//   T_i(z)    = col_scale_i ⊙ ( e_i · (scale_i · v_scale_i ⊙ (a_i · z)) )
//
// Adapter i is a_i [r_i, K], e_i [N, r_i], optional v_scale_i [r_i] and col_scale_i [N] (all fp32 or
// bf16 on the CPU; every e_i of one call in one dtype), and a float scale_i: LoRA is (A, B, -, -, s), VeRA is (A_s, B_s, d, b, 1). Rows
// whose adapter is "none" get no term. Every part but x is optional: no w (the caller ran the base
// GEMM itself and passes its result as c, or adds it later), no c, no bias.
//
// The plan says which rows use which adapter, grouped (SGMV's segments): `order` is a permutation of
// the M rows, adapter i's rows are order[offsets[i] : offsets[i+1]], and order[offsets[A] : M] are
// the rows with no adapter. Kernels walk rows in plan order, so each group of rows shares one
// adapter's factors in the register tiles (BGMV at one token per row, SGMV at many).
//
// `h` (optional output, [P, max_r] fp32 with P = offsets[A]) receives h[p, :r_i] = a_i · x_a[order[p]],
// unscaled, for the backward; columns past r_i are zero.
#pragma once
#include <vector>

#include "common.h"

namespace lowrank {

struct MixedAdapter {
  Matrix a;          // [r, K]
  Matrix e;          // [N, r]
  Matrix v_scale;    // [1, r] fp32, or ptr == 0
  Matrix col_scale;  // [1, N] fp32, or ptr == 0
  float scale = 1.0f;
  Matrix et;         // [r, N] fp32 contiguous: e transposed, kept by the caller (CPU many-token path), or ptr == 0
};

// The adapters a layer may use in one mixed batch. Built once per layer and batch (bindings.cpp),
// validated on construction; K and N are checked against x and out at each call.
struct MixedAdapters {
  std::vector<MixedAdapter> items;
  int64_t K = 0, N = 0, max_r = 0;
  int device = -1;
};

inline void validate_mixed_adapters(const MixedAdapters& t) {
  LOWRANK_CHECK(!t.items.empty(), "adapters: expected at least one adapter");
  for (const MixedAdapter& ad : t.items)
    LOWRANK_CHECK(ad.e.dtype == t.items[0].e.dtype, "adapters: every adapter's e must have one dtype (the kernels' tiles share it)");
  for (size_t i = 0; i < t.items.size(); ++i) {
    const MixedAdapter& ad = t.items[i];
    const std::string at = "adapter " + std::to_string(i) + ": ";
    const int64_t r = ad.a.rows;
    LOWRANK_CHECK(r >= 1, at + "a: expected at least one row (rank >= 1)");
    check_matrix(ad.a, (at + "a").c_str(), r, t.K);
    check_matrix(ad.e, (at + "e").c_str(), t.N, r);
    for (const Matrix* m : {&ad.a, &ad.e})
      LOWRANK_CHECK(m->dtype == DType::float32 || m->dtype == DType::bfloat16 || m->dtype == DType::float16,
            at + "a and e: expected float32, bfloat16 or float16, got " + dtype_name(m->dtype));
    if (ad.v_scale.ptr) {
      check_matrix(ad.v_scale, (at + "v_scale").c_str(), 1, r);
      LOWRANK_CHECK(ad.v_scale.dtype == DType::float32, at + "v_scale: expected float32");
    }
    if (ad.et.ptr) {
      check_matrix(ad.et, (at + "et").c_str(), r, t.N);
      LOWRANK_CHECK(ad.et.dtype == DType::float32 && (ad.et.ld == t.N || r == 1), at + "et: expected a contiguous float32 [r, N]");
    }
    if (ad.col_scale.ptr) {
      check_matrix(ad.col_scale, (at + "col_scale").c_str(), 1, t.N);
      LOWRANK_CHECK(ad.col_scale.dtype == DType::float32, at + "col_scale: expected float32");
    }
    for (const Matrix* m : {&ad.a, &ad.e, &ad.v_scale, &ad.col_scale, &ad.et})
      LOWRANK_CHECK(m->ptr == 0 || m->device == t.device, at + "every tensor must be on one device");
  }
}

struct MixedRowsArgs {
  Matrix out;      // [M, N]  float32 or x's 16-bit dtype; may be the same memory as c (in place)
  Matrix x;        // [M, K]  float32 on the CPU; w's dtype on CUDA
  Matrix xa;       // [M, K]  the adapters' input (dropout(x)), x's dtype, or ptr == 0 for x itself
  Matrix w;        // [N, K]  base weight (float32 / bfloat16; + float16 on CUDA), or ptr == 0
  Matrix bias;     // [1, N]  w's (or out's) dtype, or ptr == 0
  Matrix c;        // [M, N]  float32, added to the output (a base product computed elsewhere), or ptr == 0
  Matrix order;    // [1, M]  int32, a permutation of the rows, grouped by adapter
  Matrix offsets;  // [1, A + 1] int32, non-decreasing from 0 to at most M
  Matrix h;        // [P, max_r] float32 output, or ptr == 0
  const MixedAdapters* adapters = nullptr;
};

// Shapes, dtypes and the plan (a true permutation: no row read or written twice). The plan lives
// on the device of the data; on CUDA only its shape and dtype are checked here (the launcher
// checks the values on the device).
inline void validate_mixed_rows(const MixedRowsArgs& p, bool cuda) {
  LOWRANK_CHECK(p.adapters != nullptr, "adapters: missing");
  const MixedAdapters& t = *p.adapters;
  const int64_t M = p.x.rows, K = p.x.cols, N = p.out.cols, A = int64_t(t.items.size());
  LOWRANK_CHECK(t.K == K, "x: expected " + std::to_string(t.K) + " columns (the adapters' in_features), got " +
                      std::to_string(K));
  LOWRANK_CHECK(t.N == N, "out: expected " + std::to_string(t.N) + " columns (the adapters' out_features), got " +
                      std::to_string(N));
  check_matrix(p.out, "out", M, N);
  check_matrix(p.x, "x", M, K);
  if (p.xa.ptr) {
    check_matrix(p.xa, "adapter_input", M, K);
    LOWRANK_CHECK(p.xa.dtype == p.x.dtype, "adapter_input: expected x's dtype");
  }
  const bool x_ok = cuda ? (p.x.dtype == DType::float32 || p.x.dtype == DType::bfloat16 || p.x.dtype == DType::float16)
                         : p.x.dtype == DType::float32;
  LOWRANK_CHECK(x_ok, std::string("x: unsupported dtype ") + dtype_name(p.x.dtype));
  if (p.w.ptr) {
    check_matrix(p.w, "weight", N, K);
    LOWRANK_CHECK(p.w.dtype == DType::float32 || p.w.dtype == DType::bfloat16 || (cuda && p.w.dtype == DType::float16),
          std::string("weight: unsupported dtype ") + dtype_name(p.w.dtype));
    LOWRANK_CHECK(!cuda || p.x.dtype == p.w.dtype, "x: expected weight's dtype");
  }
  LOWRANK_CHECK(p.out.dtype == DType::float32 || p.out.dtype == DType::bfloat16 || (cuda && p.out.dtype == DType::float16),
        std::string("out: unsupported dtype ") + dtype_name(p.out.dtype));
  if (p.bias.ptr) {
    check_matrix(p.bias, "bias", 1, N);
    const DType want = p.w.ptr ? p.w.dtype : p.out.dtype;
    LOWRANK_CHECK(p.bias.dtype == want, std::string("bias: expected ") + dtype_name(want) + ", got " + dtype_name(p.bias.dtype));
  }
  if (p.c.ptr) {
    check_matrix(p.c, "c", M, N);
    LOWRANK_CHECK(p.c.dtype == DType::float32, "c: expected float32");
    LOWRANK_CHECK(p.c.ptr != p.out.ptr || (p.c.ld == p.out.ld && p.out.dtype == DType::float32),
          "c: may share memory with out only as the same float32 matrix");
  }
  check_matrix(p.order, "order", 1, M);
  LOWRANK_CHECK(p.order.dtype == DType::int32, std::string("order: expected int32, got ") + dtype_name(p.order.dtype));
  check_matrix(p.offsets, "offsets", 1, A + 1);
  LOWRANK_CHECK(p.offsets.dtype == DType::int32, std::string("offsets: expected int32, got ") + dtype_name(p.offsets.dtype));
  if (p.h.ptr) {
    LOWRANK_CHECK(p.h.cols == t.max_r && p.h.ld >= p.h.cols && p.h.dtype == DType::float32,
          "h: expected a float32 [P, max_r] matrix");
  }
  const int dev = p.x.device;
  LOWRANK_CHECK(cuda ? dev >= 0 : dev == -1, "x: on the wrong device for this launcher");
  LOWRANK_CHECK(t.device == dev, "adapters: on a different device than x");
  for (const Matrix* m : {&p.out, &p.xa, &p.w, &p.bias, &p.c, &p.order, &p.offsets, &p.h})
    LOWRANK_CHECK(m->ptr == 0 || m->device == dev, "all tensors must be on x's device");
}

// On the CPU the plan's values are checked too: order a permutation of [0, M), offsets
// non-decreasing from 0 to at most M, h's row count equal to offsets[A]. Returns P = offsets[A].
int64_t validate_mixed_plan_cpu(const MixedRowsArgs& p);

void mixed_rows_cpu(const MixedRowsArgs& a, int num_threads);

#ifdef LOWRANK_WITH_CUDA
// The plan is on the device; the launcher checks it there and raises on a lie (one small copy back).
void mixed_rows_cuda(const MixedRowsArgs& a, std::uintptr_t stream);
#endif

}  // namespace lowrank
