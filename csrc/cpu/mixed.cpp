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

// NR columns x MRT rows of one adapter group: acc += w·x over [k0, k1) and, when erow is given, the
// adapter's e·v over [0, r) in the same vector accumulators (e's rows pre-scaled by col_scale), so
// each output costs one horizontal reduction for both terms.
template <int MRT, class TW, class TE>
inline void fused_tile(const TW* const* wrow, const float* const* xrow, int64_t k0, int64_t k1, const TE* const* erow,
                       const float* const* vrow, int64_t r, const float* cs, float sums[NR][MR]) {
  constexpr int W = Vec::width;
  Vec acc[NR][MRT];
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MRT; ++m) acc[i][m] = vzero();
  float tail[NR][MRT] = {};
  int64_t k = k0;
  for (; k + W <= k1; k += W) {
    Vec wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = vload(wrow[i] + k);
    for (int m = 0; m < MRT; ++m) {
      Vec xv = vload(xrow[m] + k);
      for (int i = 0; i < NR; ++i) acc[i][m] = vfma(wv[i], xv, acc[i][m]);
    }
  }
  for (; k < k1; ++k)
    for (int i = 0; i < NR; ++i) {
      const float wk = load_scalar(wrow[i] + k);
      for (int m = 0; m < MRT; ++m) tail[i][m] += wk * xrow[m][k];
    }
  if (erow) {
    Vec csv[NR];
    for (int i = 0; i < NR; ++i) csv[i] = vset1(cs ? cs[i] : 1.f);
    int64_t j = 0;
    for (; j + W <= r; j += W) {
      Vec ev[NR];
      for (int i = 0; i < NR; ++i) ev[i] = cs ? vmul(vload(erow[i] + j), csv[i]) : vload(erow[i] + j);
      for (int m = 0; m < MRT; ++m) {
        Vec vv = vload(vrow[m] + j);
        for (int i = 0; i < NR; ++i) acc[i][m] = vfma(ev[i], vv, acc[i][m]);
      }
    }
    for (; j < r; ++j)
      for (int i = 0; i < NR; ++i) {
        const float ej = (cs ? cs[i] : 1.f) * load_scalar(erow[i] + j);
        for (int m = 0; m < MRT; ++m) tail[i][m] += ej * vrow[m][j];
      }
  }
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MRT; ++m) sums[i][m] += vsum(acc[i][m]) + tail[i][m];
}

template <class TW, class TE>
inline void fused_dispatch(int mr, const TW* const* wrow, const float* const* xrow, int64_t k0, int64_t k1,
                           const TE* const* erow, const float* const* vrow, int64_t r, const float* cs,
                           float sums[NR][MR]) {
  switch (mr) {
    case 1: fused_tile<1>(wrow, xrow, k0, k1, erow, vrow, r, cs, sums); break;
    case 2: fused_tile<2>(wrow, xrow, k0, k1, erow, vrow, r, cs, sums); break;
    case 3: fused_tile<3>(wrow, xrow, k0, k1, erow, vrow, r, cs, sums); break;
#if defined(__AVX512F__)
    case 4: fused_tile<4>(wrow, xrow, k0, k1, erow, vrow, r, cs, sums); break;
#endif
  }
}

// Expand, vectorized over output columns: val[q, n0:n1] = cs ⊙ sum_j v[q, j] · eᵀ[j, n0:n1], with eᵀ
// the adapter's e transposed once per call ([r, N] fp32). RM rows x CV vectors of accumulators.
#if defined(__AVX512F__)
constexpr int RM = 4;
#else
constexpr int RM = 2;
#endif
constexpr int CV = 4;

template <int RMT>
inline void expand_tile(const float* et, int64_t ldet, int64_t r, const float* const* vrow, int64_t n0, float* const* val) {
  constexpr int W = Vec::width;
  Vec acc[RMT][CV];
  for (int q = 0; q < RMT; ++q)
    for (int c = 0; c < CV; ++c) acc[q][c] = vzero();
  for (int64_t j = 0; j < r; ++j) {
    Vec ev[CV];
    for (int c = 0; c < CV; ++c) ev[c] = vload(et + j * ldet + n0 + c * W);
    for (int q = 0; q < RMT; ++q) {
      const Vec vq = vset1(vrow[q][j]);
      for (int c = 0; c < CV; ++c) acc[q][c] = vfma(ev[c], vq, acc[q][c]);
    }
  }
  for (int q = 0; q < RMT; ++q)
    for (int c = 0; c < CV; ++c) vstore(val[q] + c * W, acc[q][c]);
}

template <class TW, class TO>
struct RowsJob {
  const MixedRowsArgs* a;
  Plan plan;
  const float* v;
  int64_t ldv;
  int64_t col_tasks;
  const std::vector<const float*>* et;  // per adapter: e transposed ([r, N] fp32), or null

  // The block's rows [p0, p1) cut into groups of at most MR rows that share one adapter (or none).
  struct Group {
    int64_t q0, rows, adapter;
  };
  int groups_of(int64_t p0, int64_t p1, Group* g) const {
    int count = 0;
    for (int64_t i = 0; i <= plan.A; ++i) {  // adapter A: the rows with none
      const int64_t lo = i < plan.A ? plan.offsets[i] : plan.P, hi = i < plan.A ? plan.offsets[i + 1] : plan.M;
      for (int64_t s = max64(lo, p0); s < min64(hi, p1); s += MR)
        g[count++] = Group{s - p0, min64(MR, min64(hi, p1) - s), i < plan.A ? i : -1};
    }
    return count;
  }

  template <class TE, class TWR>
  void fused_group(const Group& g, const TWR* const* wrow, const float* const* xrow, int64_t k0, int64_t k1,
                   bool last, int64_t n0, int nr, const float* const* vrow, float sums[NR][MR]) const {
    if (!last || g.adapter < 0) {
      fused_dispatch<TWR, TE>(int(g.rows), wrow, xrow + g.q0, k0, k1, nullptr, nullptr, 0, nullptr, sums);
      return;
    }
    const MixedAdapter& ad = a->adapters->items[size_t(g.adapter)];
    const TE* ebase = ad.e.data<TE>();
    const TE* erow[NR];
    for (int i = 0; i < NR; ++i) erow[i] = ebase + (n0 + (i < nr ? i : 0)) * ad.e.ld;
    float cs[NR];
    const float* c = ad.col_scale.ptr ? ad.col_scale.data<float>() : nullptr;
    if (c)
      for (int i = 0; i < NR; ++i) cs[i] = c[n0 + (i < nr ? i : 0)];
    fused_dispatch<TWR, TE>(int(g.rows), wrow, xrow + g.q0, k0, k1, erow, vrow + g.q0, ad.a.rows, c ? cs : nullptr,
                            sums);
  }

  // With W: per NR-column tile, each group's base product and adapter term in one set of tiles.
  void run_fused(int64_t p0, int64_t p1, int64_t n_begin, int64_t n_end, const float* const* xrow,
                 const float* const* vrow, float (*val)[kBlockCols]) const {
    const MixedRowsArgs& A = *a;
    const int64_t n = p1 - p0, K = A.x.cols;
    const TW* w = A.w.data<TW>();
    Group groups[kBlockRows];
    const int ng = groups_of(p0, p1, groups);
    const int64_t kc = n <= MR ? max64(K, 1) : KC;
    const bool widen_block = !std::is_same<TW, float>::value && n > MR;
    alignas(64) float wide[NR][KC];
    const float* xblock[kBlockRows];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
      const int nr = int(min64(NR, n_end - n0));
      float sums[kBlockRows][NR][MR];  // per group
      for (int gi = 0; gi < ng; ++gi)
        for (int i = 0; i < NR; ++i)
          for (int m = 0; m < MR; ++m) sums[gi][i][m] = 0.f;
      const TW* wrow[NR];
      for (int i = 0; i < NR; ++i) wrow[i] = w + (n0 + (i < nr ? i : 0)) * A.w.ld;
      for (int64_t k0 = 0; k0 < max64(K, 1); k0 += kc) {
        const int64_t k1 = min64(K, k0 + kc);
        const bool last = k1 >= K;
        for (int gi = 0; gi < ng; ++gi) {
          const Group& g = groups[gi];
          const bool e16 = g.adapter >= 0 && A.adapters->items[size_t(g.adapter)].e.dtype == DType::bfloat16;
          if (widen_block) {
            if (gi == 0)  // several groups pass over this block: widen bf16 once
              for (int i = 0; i < NR; ++i) widen(wide[i], wrow[i] + k0, k1 - k0);
            const float* wide_rows[NR] = {wide[0], wide[1], wide[2], wide[3]};
            for (int64_t q = 0; q < g.rows; ++q) xblock[g.q0 + q] = xrow[g.q0 + q] + k0;
            if (e16)
              fused_group<bf16_t>(g, wide_rows, xblock, 0, k1 - k0, last, n0, nr, vrow, sums[gi]);
            else
              fused_group<float>(g, wide_rows, xblock, 0, k1 - k0, last, n0, nr, vrow, sums[gi]);
          } else if (e16) {
            fused_group<bf16_t>(g, wrow, xrow, k0, k1, last, n0, nr, vrow, sums[gi]);
          } else {
            fused_group<float>(g, wrow, xrow, k0, k1, last, n0, nr, vrow, sums[gi]);
          }
        }
      }
      for (int gi = 0; gi < ng; ++gi)
        for (int64_t q = 0; q < groups[gi].rows; ++q)
          for (int i = 0; i < nr; ++i) val[groups[gi].q0 + q][n0 - n_begin + i] = sums[gi][i][q];
    }
  }

  // Without W: each segment's term, vectorized over columns where e was transposed, else by tiles.
  void run_expand(int64_t p0, int64_t p1, int64_t n_begin, int64_t n_end, const float* const* vrow,
                  float (*val)[kBlockCols]) const {
    const MixedRowsArgs& A = *a;
    const int64_t cols = n_end - n_begin;
    constexpr int64_t CW = CV * Vec::width;
    for (int64_t i = 0; i < plan.A; ++i) {
      const int64_t s0 = max64(plan.offsets[i], p0), s1 = min64(plan.offsets[i + 1], p1);
      if (s0 >= s1) continue;
      const MixedAdapter& ad = A.adapters->items[size_t(i)];
      const float* cs = ad.col_scale.ptr ? ad.col_scale.data<float>() : nullptr;
      const float* eti = (*et)[size_t(i)];
      const int64_t r = ad.a.rows;
      if (eti) {
        int64_t n0 = n_begin;
        for (; n0 + CW <= n_end; n0 += CW)
          for (int64_t q = s0 - p0; q < s1 - p0; q += RM) {
            float* dst[RM];
            const int rm = int(min64(RM, s1 - p0 - q));
            for (int t = 0; t < RM; ++t) dst[t] = val[q + (t < rm ? t : 0)] + (n0 - n_begin);
            if (rm == RM) {
              expand_tile<RM>(eti, A.out.cols, r, vrow + q, n0, dst);
            } else {
              for (int t = 0; t < rm; ++t) expand_tile<1>(eti, A.out.cols, r, vrow + q + t, n0, dst + t);
            }
          }
        for (int64_t q = s0 - p0; q < s1 - p0; ++q) {
          for (int64_t col = n0; col < n_end; ++col) {  // column tail
            float t = 0.f;
            for (int64_t j = 0; j < r; ++j) t += vrow[q][j] * eti[j * A.out.cols + col];
            val[q][col - n_begin] = t;
          }
          if (cs)
            for (int64_t col = 0; col < cols; ++col) val[q][col] *= cs[n_begin + col];
        }
      } else {
        for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
          const int nr = int(min64(NR, n_end - n0));
          const float* zero_w[NR] = {nullptr, nullptr, nullptr, nullptr};
          for (int64_t q = s0 - p0; q < s1 - p0; q += MR) {
            const Group g{q, min64(MR, s1 - p0 - q), i};
            float sums[NR][MR] = {};
            if (ad.e.dtype == DType::bfloat16)
              fused_group_adapter_only<bf16_t>(g, zero_w, n0, nr, vrow, sums);
            else
              fused_group_adapter_only<float>(g, zero_w, n0, nr, vrow, sums);
            for (int64_t t = 0; t < g.rows; ++t)
              for (int c = 0; c < nr; ++c) val[q + t][n0 - n_begin + c] = sums[c][t];
          }
        }
      }
    }
  }

  template <class TE>
  void fused_group_adapter_only(const Group& g, const float* const* no_w, int64_t n0, int nr, const float* const* vrow,
                                float sums[NR][MR]) const {
    const MixedAdapter& ad = a->adapters->items[size_t(g.adapter)];
    const TE* ebase = ad.e.data<TE>();
    const TE* erow[NR];
    for (int i = 0; i < NR; ++i) erow[i] = ebase + (n0 + (i < nr ? i : 0)) * ad.e.ld;
    float cs[NR];
    const float* c = ad.col_scale.ptr ? ad.col_scale.data<float>() : nullptr;
    if (c)
      for (int i = 0; i < NR; ++i) cs[i] = c[n0 + (i < nr ? i : 0)];
    fused_dispatch<float, TE>(int(g.rows), no_w, vrow + g.q0, 0, 0, erow, vrow + g.q0, ad.a.rows, c ? cs : nullptr,
                              sums);
  }

  void run(int64_t p0, int64_t p1, int64_t n_begin, int64_t n_end) const {
    const MixedRowsArgs& A = *a;
    const int64_t n = p1 - p0;
    const float* xbase = A.x.data<float>();
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
    alignas(64) float val[kBlockRows][kBlockCols];  // the block's base + adapter terms
    const int64_t cols = n_end - n_begin;
    for (int64_t q = max64(plan.P - p0, 0); q < n; ++q)  // rows with no adapter (the rest is written)
      for (int64_t col = 0; col < cols; ++col) val[q][col] = 0.f;
    if (A.w.ptr)
      run_fused(p0, p1, n_begin, n_end, xrow, vrow, val);
    else
      run_expand(p0, p1, n_begin, n_end, vrow, val);
    for (int64_t q = 0; q < n; ++q)
      epilogue(val[q], bias ? bias + n_begin : nullptr, c ? c + rows[q] * A.c.ld + n_begin : nullptr,
               out + rows[q] * A.out.ld + n_begin, cols);
  }

  // dst = val + bias + c, rounded once to TO.
  static void epilogue(const float* val, const TW* bias, const float* c, TO* dst, int64_t cols) {
    constexpr int W = Vec::width;
    int64_t j = 0;
    if constexpr (std::is_same<TO, float>::value) {
      for (; j + W <= cols; j += W) {
        Vec y = vload(val + j);
        if (bias) y = vadd(y, vload(bias + j));
        if (c) y = vadd(y, vload(c + j));
        vstore(dst + j, y);
      }
    }
    for (; j < cols; ++j) {
      float y = val[j];
      if (bias) y += load_scalar(bias + j);
      if (c) y += c[j];
      store_scalar(dst + j, y);
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
void rows_phase(const MixedRowsArgs& a, const Plan& plan, const float* v, int64_t ldv,
                const std::vector<const float*>& et, int num_threads) {
  RowsJob<TW, TO> job{&a, plan, v, ldv, (a.out.cols + kBlockCols - 1) / kBlockCols, &et};
  const int64_t blocks = (plan.M + kBlockRows - 1) / kBlockRows;
  parallel_for(blocks * job.col_tasks, num_threads, &RowsJob<TW, TO>::task, &job);
}

// e transposed to [r, N] fp32 for the adapters whose segments are long enough that the vectorized
// expand pays for the transpose (the no-W path only).
struct TransposeJob {
  const MixedRowsArgs* a;
  std::vector<int64_t> which;
  std::vector<float*> dst;
  static void task(void* ctx, int64_t t) {
    auto* job = static_cast<const TransposeJob*>(ctx);
    const MixedAdapter& ad = job->a->adapters->items[size_t(job->which[size_t(t)])];
    const int64_t N = ad.e.rows, r = ad.e.cols;
    float* out = job->dst[size_t(t)];
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < r; ++j)
        out[j * N + n] = ad.e.dtype == DType::bfloat16 ? load_scalar(ad.e.data<bf16_t>() + n * ad.e.ld + j)
                                                       : ad.e.data<float>()[n * ad.e.ld + j];
  }
};
constexpr int64_t kTransposeMinRows = 16;  // rows of one adapter from which its e is transposed

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

  std::vector<const float*> et(size_t(plan.A), nullptr);
  std::vector<float> et_store;
  if (!a.w.ptr) {
    TransposeJob tj{&a, {}, {}};
    int64_t total = 0;
    for (int64_t i = 0; i < plan.A; ++i)
      if (plan.offsets[i + 1] - plan.offsets[i] >= kTransposeMinRows) {
        tj.which.push_back(i);
        total += a.adapters->items[size_t(i)].e.rows * a.adapters->items[size_t(i)].e.cols;
      }
    et_store.resize(size_t(total));
    int64_t at = 0;
    for (int64_t i : tj.which) {
      tj.dst.push_back(et_store.data() + at);
      et[size_t(i)] = et_store.data() + at;
      at += a.adapters->items[size_t(i)].e.rows * a.adapters->items[size_t(i)].e.cols;
    }
    parallel_for(int64_t(tj.which.size()), num_threads, &TransposeJob::task, &tj);
  }

  // W's dtype, or with no W the bias's (out's) dtype, picks TW; out's dtype picks TO.
  const DType tw = a.w.ptr ? a.w.dtype : a.bias.ptr ? a.bias.dtype : DType::float32;
  const bool o16 = a.out.dtype == DType::bfloat16;
  if (tw == DType::bfloat16)
    return o16 ? rows_phase<bf16_t, bf16_t>(a, plan, v.data(), ldv, et, num_threads)
               : rows_phase<bf16_t, float>(a, plan, v.data(), ldv, et, num_threads);
  return o16 ? rows_phase<float, bf16_t>(a, plan, v.data(), ldv, et, num_threads)
             : rows_phase<float, float>(a, plan, v.data(), ldv, et, num_threads);
}

}  // namespace lowrank::cpu::LOWRANK_ISA
