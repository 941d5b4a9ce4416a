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
#include <memory>
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

// One row's adapter inside a tile of NR output columns: its e rows for those columns, col_scale
// values (or null), rank and v row. rank == 0: the row has no adapter.
template <class TE>
struct RowAdapter {
  const TE* e[NR];
  const float* cs;
  int64_t r;
  const float* v;
};

// NR columns x MRT rows: acc += w·x over [k0, k1) and, for rows with an adapter (ra given), that
// adapter's e·v over [0, r) in the same vector accumulators (e pre-scaled by col_scale), so each
// output costs one horizontal reduction for both terms. Rows of one tile may use different
// adapters: the base product is shared, only the short adapter loop is per row.
template <int MRT, class TW, class TE>
inline void fused_tile(const TW* const* wrow, const float* const* xrow, int64_t k0, int64_t k1,
                       const RowAdapter<TE>* ra, float sums[NR][MR]) {
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
  if (ra) {
    for (int m = 0; m < MRT; ++m) {
      const RowAdapter<TE>& t = ra[m];
      int64_t j = 0;
      for (; j + W <= t.r; j += W) {
        const Vec vv = vload(t.v + j);
        for (int i = 0; i < NR; ++i) {
          const Vec ev = t.cs ? vmul(vload(t.e[i] + j), vset1(t.cs[i])) : vload(t.e[i] + j);
          acc[i][m] = vfma(ev, vv, acc[i][m]);
        }
      }
      for (; j < t.r; ++j)
        for (int i = 0; i < NR; ++i) tail[i][m] += (t.cs ? t.cs[i] : 1.f) * load_scalar(t.e[i] + j) * t.v[j];
    }
  }
  float total[NR * MRT];
  vsums<NR * MRT>(&acc[0][0], total);
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MRT; ++m) sums[i][m] += total[i * MRT + m] + tail[i][m];
}

template <class TW, class TE>
inline void fused_dispatch(int mr, const TW* const* wrow, const float* const* xrow, int64_t k0, int64_t k1,
                           const RowAdapter<TE>* ra, float sums[NR][MR]) {
  switch (mr) {
    case 1: fused_tile<1>(wrow, xrow, k0, k1, ra, sums); break;
    case 2: fused_tile<2>(wrow, xrow, k0, k1, ra, sums); break;
    case 3: fused_tile<3>(wrow, xrow, k0, k1, ra, sums); break;
#if defined(__AVX512F__)
    case 4: fused_tile<4>(wrow, xrow, k0, k1, ra, sums); break;
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
  bool e_bf16;                          // every adapter's e is bf16 (else every one is fp32)

  // Row q's adapter in a tile of NR columns at n0 (rank 0 for rows with none). cs_buf: NR floats.
  template <class TE>
  RowAdapter<TE> row_adapter(int64_t adapter, int64_t n0, int nr, const float* vrow, float* cs_buf) const {
    RowAdapter<TE> t{};
    if (adapter < 0) return t;
    const MixedAdapter& ad = a->adapters->items[size_t(adapter)];
    const TE* ebase = ad.e.data<TE>();
    for (int i = 0; i < NR; ++i) t.e[i] = ebase + (n0 + (i < nr ? i : 0)) * ad.e.ld;
    if (ad.col_scale.ptr) {
      const float* c = ad.col_scale.data<float>();
      for (int i = 0; i < NR; ++i) cs_buf[i] = c[n0 + (i < nr ? i : 0)];
      t.cs = cs_buf;
    }
    t.r = ad.a.rows;
    t.v = vrow;
    return t;
  }

  // With W: per NR-column tile, groups of MR rows in plan order stream the tile's W rows; in the last
  // K block each row's own adapter term joins its accumulators (BGMV).
  template <class TE>
  void run_fused(int64_t p0, int64_t p1, int64_t n_begin, int64_t n_end, const float* const* xrow,
                 const float* const* vrow, const int64_t* adapter_of, float (*val)[kBlockCols]) const {
    const MixedRowsArgs& A = *a;
    const int64_t n = p1 - p0, K = A.x.cols;
    const TW* w = A.w.data<TW>();
    const int64_t kc = n <= MR ? max64(K, 1) : KC;
    const bool widen_block = !std::is_same<TW, float>::value && n > MR;
    alignas(64) float wide[NR][KC];
    const float* xblock[kBlockRows];
    RowAdapter<TE> ra[kBlockRows];
    float cs_buf[kBlockRows][NR];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
      const int nr = int(min64(NR, n_end - n0));
      float sums[kBlockRows / MR + 1][NR][MR];
      for (int64_t g = 0; g * MR < n; ++g)
        for (int i = 0; i < NR; ++i)
          for (int m = 0; m < MR; ++m) sums[g][i][m] = 0.f;
      for (int64_t q = 0; q < n; ++q) ra[q] = row_adapter<TE>(adapter_of[q], n0, nr, vrow[q], cs_buf[q]);
      const TW* wrow[NR];
      for (int i = 0; i < NR; ++i) wrow[i] = w + (n0 + (i < nr ? i : 0)) * A.w.ld;
      for (int64_t k0 = 0; k0 < max64(K, 1); k0 += kc) {
        const int64_t k1 = min64(K, k0 + kc);
        const RowAdapter<TE>* with = k1 >= K ? ra : nullptr;  // the adapter terms once, in the last block
        if (widen_block) {  // several row groups pass over this block: widen bf16 once
          for (int i = 0; i < NR; ++i) widen(wide[i], wrow[i] + k0, k1 - k0);
          const float* wide_rows[NR] = {wide[0], wide[1], wide[2], wide[3]};
          for (int64_t q = 0; q < n; ++q) xblock[q] = xrow[q] + k0;
          for (int64_t q0 = 0, g = 0; q0 < n; q0 += MR, ++g)
            fused_dispatch<float, TE>(int(min64(MR, n - q0)), wide_rows, xblock + q0, 0, k1 - k0,
                                      with ? with + q0 : nullptr, sums[g]);
        } else {
          for (int64_t q0 = 0, g = 0; q0 < n; q0 += MR, ++g)
            fused_dispatch<TW, TE>(int(min64(MR, n - q0)), wrow, xrow + q0, k0, k1, with ? with + q0 : nullptr,
                                   sums[g]);
        }
      }
      for (int64_t q = 0; q < n; ++q)
        for (int i = 0; i < nr; ++i) val[q][n0 - n_begin + i] = sums[q / MR][i][q % MR];
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
      } else {  // a short segment: the adapter-only tiles (one reduction per output)
        const bool e16 = ad.e.dtype == DType::bfloat16;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
          const int nr = int(min64(NR, n_end - n0));
          for (int64_t q = s0 - p0; q < s1 - p0; q += MR) {
            const int mr = int(min64(MR, s1 - p0 - q));
            float sums[NR][MR] = {};
            float cs_buf[MR][NR];
            if (e16) {
              RowAdapter<bf16_t> ra[MR];
              for (int t = 0; t < mr; ++t) ra[t] = row_adapter<bf16_t>(i, n0, nr, vrow[q + t], cs_buf[t]);
              fused_dispatch<float, bf16_t>(mr, nullptr, vrow + q, 0, 0, ra, sums);
            } else {
              RowAdapter<float> ra[MR];
              for (int t = 0; t < mr; ++t) ra[t] = row_adapter<float>(i, n0, nr, vrow[q + t], cs_buf[t]);
              fused_dispatch<float, float>(mr, nullptr, vrow + q, 0, 0, ra, sums);
            }
            for (int t = 0; t < mr; ++t)
              for (int c = 0; c < nr; ++c) val[q + t][n0 - n_begin + c] = sums[c][t];
          }
        }
      }
    }
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
    int64_t adapter_of[kBlockRows];
    for (int64_t q = 0, i = 0; q < n; ++q) {
      rows[q] = plan.order[p0 + q];
      xrow[q] = xbase + rows[q] * A.x.ld;
      vrow[q] = p0 + q < plan.P ? v + (p0 + q) * ldv : nullptr;
      while (i < plan.A && plan.offsets[i + 1] <= p0 + q) ++i;
      adapter_of[q] = i < plan.A ? i : -1;
    }
    alignas(64) float val[kBlockRows][kBlockCols];  // the block's base + adapter terms
    const int64_t cols = n_end - n_begin;
    for (int64_t q = max64(plan.P - p0, 0); q < n; ++q)  // rows with no adapter (the rest is written)
      for (int64_t col = 0; col < cols; ++col) val[q][col] = 0.f;
    if (A.w.ptr && e_bf16)
      run_fused<bf16_t>(p0, p1, n_begin, n_end, xrow, vrow, adapter_of, val);
    else if (A.w.ptr)
      run_fused<float>(p0, p1, n_begin, n_end, xrow, vrow, adapter_of, val);
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
  RowsJob<TW, TO> job{&a, plan, v, ldv, (a.out.cols + kBlockCols - 1) / kBlockCols, &et,
                      a.adapters->items[0].e.dtype == DType::bfloat16};
  const int64_t blocks = (plan.M + kBlockRows - 1) / kBlockRows;
  parallel_for(blocks * job.col_tasks, num_threads, &RowsJob<TW, TO>::task, &job);
}

// e transposed to [r, N] fp32 for the adapters whose segments are long enough that the vectorized
// expand pays for the transpose (the no-W path only).
struct TransposeJob {
  const MixedRowsArgs* a;
  std::vector<int64_t> which;
  std::vector<float*> dst;
  template <class TE>
  static void transpose(const MixedAdapter& ad, float* out) {
    const int64_t N = ad.e.rows, r = ad.e.cols, ld = ad.e.ld;
    const TE* e = ad.e.data<TE>();
    for (int64_t n0 = 0; n0 < N; n0 += 64) {  // 64 columns x r: both sides stay in L1
      const int64_t n1 = min64(N, n0 + 64);
      for (int64_t j = 0; j < r; ++j) {
        float* dst = out + j * N;
        for (int64_t n = n0; n < n1; ++n) dst[n] = load_scalar(e + n * ld + j);
      }
    }
  }
  static void task(void* ctx, int64_t t) {
    auto* job = static_cast<const TransposeJob*>(ctx);
    const MixedAdapter& ad = job->a->adapters->items[size_t(job->which[size_t(t)])];
    if (ad.e.dtype == DType::bfloat16)
      transpose<bf16_t>(ad, job->dst[size_t(t)]);
    else
      transpose<float>(ad, job->dst[size_t(t)]);
  }
};
constexpr int64_t kTransposeMinRows = 4;  // rows of one adapter from which its e is transposed

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
  // A few rows' shrink (decode) is a few microseconds of FMAs: not worth waking the thread team for.
  const bool small = plan.P * a.x.cols * a.adapters->max_r <= (int64_t(1) << 18);
  parallel_for(int64_t(shrink.task_p0.size()), small ? 1 : num_threads, &ShrinkJob::task, &shrink);

  std::vector<const float*> et(size_t(plan.A), nullptr);
  std::unique_ptr<float[]> et_store;  // uninitialized: every element is written
  if (!a.w.ptr) {
    TransposeJob tj{&a, {}, {}};
    int64_t total = 0;
    for (int64_t i = 0; i < plan.A; ++i) {
      const MixedAdapter& ad = a.adapters->items[size_t(i)];
      if (ad.et.ptr) {  // the caller keeps eᵀ (a layer's cached view): nothing to transpose
        et[size_t(i)] = ad.et.data<float>();
        continue;
      }
      if (plan.offsets[i + 1] - plan.offsets[i] >= kTransposeMinRows) {
        tj.which.push_back(i);
        total += ad.e.rows * ad.e.cols;
      }
    }
    et_store.reset(new float[size_t(total > 0 ? total : 1)]);
    int64_t at = 0;
    for (int64_t i : tj.which) {
      tj.dst.push_back(et_store.get() + at);
      et[size_t(i)] = et_store.get() + at;
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
