// Mixed-adapter rows on the CPU (compiled once per instruction set; see simd.h and mixed.h).
//
//   out[m, :] = c[m, :] + x[m] Wᵀ + bias + T_a(m)(x_a[m]),   T_i(z) = c_i ⊙ (e_i (s_i d_i ⊙ (a_i z)))
//
// Two phases, each one parallel_for:
//
// 1. Shrink (SGMV's first half): v[p, :r_i] = s_i d_i ⊙ (a_i x_a[order[p]]) for the rows of each
//    adapter's segment, gathering the x rows by pointer. Tasks are (adapter, up to 64 of its rows):
//    a_i's r_i rows (a few KiB) stay in L1/L2 while every row group passes over them. h, the
//    unscaled a_i x_a, is written too when the backward needs it.
// 2. Rows: tasks are (block of 64 rows in plan order, 64 output columns). Per NR-column tile, the
//    base product of all the block's rows streams W once (BGMV: the weight is read once for the
//    whole batch, whatever adapters its rows use), then each adapter segment inside the block runs
//    the same register tiles over [v | e_i] — rows of one segment share e_i's NR rows, so the term
//    costs what a single adapter's would. Rows are gathered and scattered through `order`; no copy
//    of x or out is made. Without W (many tokens: the caller ran the base GEMM) phase 2 is the
//    expand half of SGMV, writing c + bias + term.
//
// Accumulation is fp32; each output is rounded once.
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/parallel_for.h"
#include "cpu/simd.h"
#include "cpu/tile.h"
#include "mixed.h"

namespace lowrank::cpu::LOWRANK_ISA {
namespace {

constexpr int64_t kBlockRows = 64;  // plan rows per block (one pass over W per block)
constexpr int64_t kBlockCols = 64;  // output columns per task
constexpr int64_t KC = 1024;        // K block when a row block has more than MR rows (as lora.cpp)

inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// sums[g][i][q] += tiles of NR rows of w (type TW) against the rows xrow[q] over [k0, k1).
template <class TW>
inline void tiles_over_rows(int64_t nrows, const TW* const* wrow, const float* const* xrow, int64_t k0,
                            int64_t k1, float (*sums)[NR][MR]) {
  for (int64_t q0 = 0, g = 0; q0 < nrows; q0 += MR, ++g)
    tile_dispatch_rows(int(min64(MR, nrows - q0)), wrow, xrow + q0, k0, k1, sums[g]);
}

struct Plan {
  const int32_t* order;
  const int32_t* offsets;
  int64_t A, P, M;
};

// ---- phase 1: v = s d ⊙ (a x_a) per segment ----------------------------------------------------
struct ShrinkJob {
  const MixedRowsArgs* a;
  Plan plan;
  float* v;  // [P, max_r]
  int64_t ldv;
  std::vector<int64_t> task_adapter, task_p0;  // task t: adapter, first plan row (up to kBlockRows)

  template <class TA>
  void run(const MixedAdapter& ad, int64_t p0, int64_t p1) const {
    const MixedRowsArgs& A = *a;
    const Matrix& xs = A.xa.ptr ? A.xa : A.x;
    const float* xbase = xs.data<float>();
    const float* xrow[kBlockRows];
    const int64_t n = p1 - p0, K = xs.cols, r = ad.a.rows;
    for (int64_t q = 0; q < n; ++q) xrow[q] = xbase + int64_t(plan.order[p0 + q]) * xs.ld;
    const TA* abase = ad.a.data<TA>();
    const float* d = ad.v_scale.ptr ? ad.v_scale.data<float>() : nullptr;
    float* h = A.h.ptr ? A.h.data<float>() : nullptr;
    for (int64_t j0 = 0; j0 < r; j0 += NR) {
      const int nr = int(min64(NR, r - j0));
      const TA* arow[NR];
      for (int i = 0; i < NR; ++i) arow[i] = abase + (j0 + (i < nr ? i : 0)) * ad.a.ld;
      float sums[kBlockRows / MR + 1][NR][MR] = {};
      tiles_over_rows(n, arow, xrow, 0, K, sums);
      for (int64_t q = 0; q < n; ++q)
        for (int i = 0; i < nr; ++i) {
          const float t = sums[q / MR][i][q % MR];
          const int64_t j = j0 + i;
          v[(p0 + q) * ldv + j] = ad.scale * (d ? d[j] : 1.f) * t;
          if (h) h[(p0 + q) * A.h.ld + j] = t;
        }
    }
    if (h)  // the contract: h is zero past this adapter's rank
      for (int64_t q = 0; q < n; ++q)
        for (int64_t j = r; j < A.h.cols; ++j) h[(p0 + q) * A.h.ld + j] = 0.f;
  }

  static void task(void* ctx, int64_t t) {
    auto* job = static_cast<const ShrinkJob*>(ctx);
    const int64_t i = job->task_adapter[size_t(t)], p0 = job->task_p0[size_t(t)];
    const int64_t p1 = min64(job->plan.offsets[i + 1], p0 + kBlockRows);
    const MixedAdapter& ad = job->a->adapters->items[size_t(i)];
    if (ad.a.dtype == DType::bfloat16)
      job->run<bf16_t>(ad, p0, p1);
    else
      job->run<float>(ad, p0, p1);
  }
};

// ---- phase 2: out = c + x Wᵀ + bias + col_scale ⊙ (v eᵀ) ----------------------------------------
template <class TW, class TO>
struct RowsJob {
  const MixedRowsArgs* a;
  Plan plan;
  const float* v;
  int64_t ldv;
  int64_t col_tasks;

  template <class TE>
  static void adapter_tile(const MixedAdapter& ad, int64_t n0, int nr, int64_t nrows, const float* const* vrow,
                           float (*acc)[NR]) {
    const TE* ebase = ad.e.data<TE>();
    const TE* erow[NR];
    for (int i = 0; i < NR; ++i) erow[i] = ebase + (n0 + (i < nr ? i : 0)) * ad.e.ld;
    const float* cs = ad.col_scale.ptr ? ad.col_scale.data<float>() : nullptr;
    for (int64_t q0 = 0; q0 < nrows; q0 += MR) {
      const int mr = int(min64(MR, nrows - q0));
      float t[NR][MR] = {};
      tile_dispatch_rows(mr, erow, vrow + q0, 0, ad.a.rows, t);
      for (int m = 0; m < mr; ++m)
        for (int i = 0; i < nr; ++i) acc[q0 + m][i] = (cs ? cs[n0 + i] : 1.f) * t[i][m];
    }
  }

  void run(int64_t p0, int64_t p1, int64_t n_begin, int64_t n_end) const {
    const MixedRowsArgs& A = *a;
    const int64_t n = p1 - p0, K = A.x.cols;
    const float* xbase = A.x.data<float>();
    const TW* w = A.w.ptr ? A.w.data<TW>() : nullptr;
    const TW* bias = A.bias.ptr ? A.bias.data<TW>() : nullptr;
    const float* c = A.c.ptr ? A.c.data<float>() : nullptr;
    TO* out = A.out.data<TO>();
    int64_t rows[kBlockRows];
    const float* xrow[kBlockRows];
    const float* vrow[kBlockRows];
    for (int64_t q = 0; q < n; ++q) {
      rows[q] = plan.order[p0 + q];
      xrow[q] = xbase + rows[q] * A.x.ld;
      vrow[q] = p0 + q < plan.P ? v + (p0 + q) * ldv : nullptr;
    }
    const int64_t kc = n <= MR ? max64(K, 1) : KC;
    const bool widen_block = w && !std::is_same<TW, float>::value && n > MR;
    alignas(64) float wide[NR][KC];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
      const int nr = int(min64(NR, n_end - n0));
      float sums[kBlockRows / MR + 1][NR][MR] = {};
      if (w) {
        const TW* wrow[NR];
        for (int i = 0; i < NR; ++i) wrow[i] = w + (n0 + (i < nr ? i : 0)) * A.w.ld;
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t k1 = min64(K, k0 + kc);
          if (widen_block) {  // several row groups pass over this block: widen bf16 once
            for (int i = 0; i < NR; ++i) widen(wide[i], wrow[i] + k0, k1 - k0);
            const float* wide_rows[NR] = {wide[0], wide[1], wide[2], wide[3]};
            const float* xblock[kBlockRows];
            for (int64_t q = 0; q < n; ++q) xblock[q] = xrow[q] + k0;
            tiles_over_rows(n, wide_rows, xblock, 0, k1 - k0, sums);
          } else {
            tiles_over_rows(n, wrow, xrow, k0, k1, sums);
          }
        }
      }
      float acc[kBlockRows][NR] = {};  // the adapter term per row; zero for rows with none
      for (int64_t i = 0; i < plan.A; ++i) {
        const int64_t s0 = max64(plan.offsets[i], p0), s1 = min64(plan.offsets[i + 1], p1);
        if (s0 >= s1) continue;
        const MixedAdapter& ad = A.adapters->items[size_t(i)];
        if (ad.e.dtype == DType::bfloat16)
          adapter_tile<bf16_t>(ad, n0, nr, s1 - s0, vrow + (s0 - p0), acc + (s0 - p0));
        else
          adapter_tile<float>(ad, n0, nr, s1 - s0, vrow + (s0 - p0), acc + (s0 - p0));
      }
      for (int i = 0; i < nr; ++i) {
        const int64_t col = n0 + i;
        const float b = bias ? load_scalar(bias + col) : 0.f;
        for (int64_t q = 0; q < n; ++q) {
          float y = sums[q / MR][i][q % MR] + acc[q][i] + b;
          if (c) y += c[rows[q] * A.c.ld + col];
          store_scalar(out + rows[q] * A.out.ld + col, y);
        }
      }
    }
  }

  static void task(void* ctx, int64_t t) {
    auto* job = static_cast<const RowsJob*>(ctx);
    const int64_t block = t / job->col_tasks, col = t % job->col_tasks;
    const int64_t p0 = block * kBlockRows, n0 = col * kBlockCols;
    job->run(p0, min64(job->plan.M, p0 + kBlockRows), n0, min64(job->a->out.cols, n0 + kBlockCols));
  }
};

template <class TW, class TO>
void rows_phase(const MixedRowsArgs& a, const Plan& plan, const float* v, int64_t ldv, int num_threads) {
  RowsJob<TW, TO> job{&a, plan, v, ldv, (a.out.cols + kBlockCols - 1) / kBlockCols};
  const int64_t blocks = (plan.M + kBlockRows - 1) / kBlockRows;
  parallel_for(blocks * job.col_tasks, num_threads, &RowsJob<TW, TO>::task, &job);
}

}  // namespace

// Entry point for this instruction set; arguments and plan already validated (dispatch.cpp).
void mixed_rows(const MixedRowsArgs& a, int num_threads) {
  Plan plan{a.order.data<int32_t>(), a.offsets.data<int32_t>(), int64_t(a.adapters->items.size()), 0, a.x.rows};
  plan.P = plan.offsets[plan.A];
  const int64_t ldv = a.adapters->max_r;
  std::vector<float> v(size_t(plan.P * ldv));
  ShrinkJob shrink{&a, plan, v.data(), ldv, {}, {}};
  for (int64_t i = 0; i < plan.A; ++i)
    for (int64_t p0 = plan.offsets[i]; p0 < plan.offsets[i + 1]; p0 += kBlockRows) {
      shrink.task_adapter.push_back(i);
      shrink.task_p0.push_back(p0);
    }
  parallel_for(int64_t(shrink.task_p0.size()), num_threads, &ShrinkJob::task, &shrink);

  // W's dtype, or with no W the bias's (out's) dtype, picks TW; out's dtype picks TO.
  const DType tw = a.w.ptr ? a.w.dtype : a.bias.ptr ? a.bias.dtype : DType::float32;
  const bool o16 = a.out.dtype == DType::bfloat16;
  if (tw == DType::bfloat16)
    return o16 ? rows_phase<bf16_t, bf16_t>(a, plan, v.data(), ldv, num_threads)
               : rows_phase<bf16_t, float>(a, plan, v.data(), ldv, num_threads);
  return o16 ? rows_phase<float, bf16_t>(a, plan, v.data(), ldv, num_threads)
             : rows_phase<float, float>(a, plan, v.data(), ldv, num_threads);
}

}  // namespace lowrank::cpu::LOWRANK_ISA
