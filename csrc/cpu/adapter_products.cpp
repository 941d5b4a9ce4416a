// The adapter's side of LoRA/VeRA training on the CPU: two skinny products from one pass over x
// (compiled once per instruction set; simd.h).
//
//   c[m, :] = scale * sum_k x[m, k] * y[k, :]        [M, R]   (y: [K, R], or [R, K] read transposed)
//   d[k, :] = scale * sum_m x[m, k] * u[m, :]        [K, R]   (or written transposed, as [R, K])
//
// With x = dy, y = B and u = u it is g = s·dy B and grad_B = s·dyᵀ u in one read of dy; with x = x_a
// and u = g alone it is grad_A = gᵀ x_a; with x = x_a and y = Aᵀ alone it is u = x_a Aᵀ. x is read in
// its own dtype (fp32 or bf16, widened in registers: no fp32 copy of a [M, K] activation, whose fresh
// pages cost more than the product), everything accumulates in fp32 and is rounded once.
//
// The R columns run in vector-wide chunks (y, u zero-padded to a multiple of the width when needed);
// a register block of MB rows of x keeps MB accumulators of c and MB rows of u in registers, so each
// x element costs one broadcast and two FMAs, and d[k] one load and one store per MB rows. Rows are
// split over tasks when c is wanted (each task its own partial d, summed at the end in task order:
// the same bits for the same thread count); d alone splits k instead (no partials). Where x and y are
// both bf16 and the CPU has AVX512-BF16, c's products take vdpbf16ps on x as it is (block_dp).
// (Zen 5, x Aᵀ at 512 x 576, r = 16: 35 -> 22 us; with the vectorized write of d, the dy pass at
// 512 x 1536 156 -> 123 us, 38 -> 14 us at 8 rows.)
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/parallel_for.h"
#include "cpu/simd.h"
#include "lora.h"

namespace lowrank::cpu::LOWRANK_ISA {
namespace {

constexpr int W = Vec::width;
constexpr int MB = W == 16 ? 8 : 4;  // x rows per register block (AVX-512: 32 registers; AVX2: 16)
constexpr int64_t KB = 256;          // k block: an MB x KB fp32 tile of x stays in L1
constexpr int64_t CHAIN = 32;        // the longest sequential fp32 sum of c (then added to its partial)

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct Plan {
  int64_t M, K, R, Rp;
  const float* y;  // [K, Rp] (row stride ldy) or null
  int64_t ldy;
  const uint32_t* yp;  // DP: y as bf16 pairs, [ceil(K / 2), Rp] (k = 2j in the low half), zero-padded
  const float* u;  // [M, Rp] (row stride ldu) or null
  int64_t ldu;
  float* c;        // [M, Rp] fp32 scratch, or null
  float* d;        // [slices, K, Rp] fp32 scratch, or null
  int64_t tasks;
  bool split_rows;  // tasks own row ranges (and a d slice each); else k ranges of one d slice
  const AdapterProductsArgs* a;
};

// One register block: rows i < NB of the x tile (fp32, row stride xs) against k in [0, kb).
template <int NB, bool HY, bool HU>
inline void block(const float* xt, int64_t xs, int64_t kb, const float* y, int64_t ldy, const float* const* u_rows,
                  float* const* c_rows, float* d, int64_t Rp) {
  Vec acc[NB], ur[NB];
  if (HU)
    for (int i = 0; i < NB; ++i) ur[i] = vload(u_rows[i]);
  // c's sums run in chains of at most CHAIN terms, each added to the partial in memory: a sequential
  // fp32 sum's error grows with its length, and K runs to thousands.
  for (int64_t k0 = 0; k0 < kb; k0 += CHAIN) {
    const int64_t k1 = min64(kb, k0 + CHAIN);
    if (HY)
      for (int i = 0; i < NB; ++i) acc[i] = vzero();
    for (int64_t k = k0; k < k1; ++k) {
      Vec xb[NB];
      for (int i = 0; i < NB; ++i) xb[i] = vset1(xt[i * xs + k]);
      if (HY) {
        const Vec yv = vload(y + k * ldy);
        for (int i = 0; i < NB; ++i) acc[i] = vfma(xb[i], yv, acc[i]);
      }
      if (HU) {
        Vec d0 = vload(d + k * Rp), d1 = vzero();  // two chains: NB dependent FMAs would wait on latency
        for (int i = 0; i < NB; i += 2) d0 = vfma(xb[i], ur[i], d0);
        for (int i = 1; i < NB; i += 2) d1 = vfma(xb[i], ur[i], d1);
        vstore(d + k * Rp, vadd(d0, d1));
      }
    }
    if (HY)
      for (int i = 0; i < NB; ++i) vstore(c_rows[i], vadd(vload(c_rows[i]), acc[i]));
  }
}

template <bool HY, bool HU>
inline void block_dispatch(int nb, const float* xt, int64_t xs, int64_t kb, const float* y, int64_t ldy,
                           const float* const* u_rows, float* const* c_rows, float* d, int64_t Rp) {
  with_count<8>(nb, [&](auto n) { block<decltype(n)::value, HY, HU>(xt, xs, kb, y, ldy, u_rows, c_rows, d, Rp); });
}

#if defined(__AVX512F__)
// block's twin where x and y both come as bf16 and the CPU has AVX512-BF16 (DP): c's products a k pair
// per vdpbf16ps, x read as it is (two bf16 broadcast as one 32-bit lane) against y's packed pairs; the
// products are exact and the sums fp32 as in block (the instruction flushes subnormals). d's, when
// wanted, as in block from the widened tile. kb0 is even (KB is), so the pairs are the global ones;
// an odd kb ends with a single k, read alone (its pair's y half is zero).
LOWRANK_BF16_DOT inline __m512bh pair_at(const bf16_t* p) {  // p[0], p[1] in every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, p, sizeof pair);
  return (__m512bh)_mm512_set1_epi32(pair);
}

template <int NB, bool HU>
LOWRANK_BF16_DOT inline void block_dp(const bf16_t* xr, int64_t ldx, const float* xt, int64_t xs, int64_t kb,
                                      const uint32_t* yp, int64_t Rp, const float* const* u_rows,
                                      float* const* c_rows, float* d) {
  __m512 acc[NB], acc2[NB];
  Vec ur[NB];
  if (HU)
    for (int i = 0; i < NB; ++i) ur[i] = vload(u_rows[i]);
  const int64_t kfull = kb & ~int64_t(1);  // k pairs wholly inside the block; an odd kb leaves one k
  for (int64_t k0 = 0; k0 < kb; k0 += CHAIN) {  // CHAIN is even: chains of CHAIN / 2 pairs
    const int64_t k1 = min64(kb, k0 + CHAIN), k1p = min64(kfull, k1);
    for (int i = 0; i < NB; ++i) acc[i] = acc2[i] = _mm512_setzero_ps();
    // two pairs a step, into two sets of sums (NB chains alone would wait on the instruction's latency);
    // x[i, k..k+1] is one 32-bit lane, broadcast from memory
    int64_t k = k0;
    for (; k + 4 <= k1p; k += 4) {
      const __m512bh y0 = (__m512bh)_mm512_loadu_si512(yp + (k / 2) * Rp);
      const __m512bh y1 = (__m512bh)_mm512_loadu_si512(yp + (k / 2 + 1) * Rp);
      for (int i = 0; i < NB; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], pair_at(xr + i * ldx + k), y0);
      for (int i = 0; i < NB; ++i) acc2[i] = _mm512_dpbf16_ps(acc2[i], pair_at(xr + i * ldx + k + 2), y1);
    }
    if (k < k1p) {  // one pair left
      const __m512bh y0 = (__m512bh)_mm512_loadu_si512(yp + (k / 2) * Rp);
      for (int i = 0; i < NB; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], pair_at(xr + i * ldx + k), y0);
      k += 2;
    }
    if (k < k1) {  // the block's last k alone (its pair's y half is zero; x[i, k + 1] is not read)
      const __m512bh y0 = (__m512bh)_mm512_loadu_si512(yp + (k / 2) * Rp);
      for (int i = 0; i < NB; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(int(xr[i * ldx + k])), y0);
    }
    if (HU)
      for (int64_t kk = k0; kk < k1; ++kk) {  // d[k] += sum_i x[i, k] u[i], as block does
        Vec d0 = vload(d + kk * Rp), d1 = vzero();
        for (int i = 0; i < NB; i += 2) d0 = vfma(vset1(xt[i * xs + kk]), ur[i], d0);
        for (int i = 1; i < NB; i += 2) d1 = vfma(vset1(xt[i * xs + kk]), ur[i], d1);
        vstore(d + kk * Rp, vadd(d0, d1));
      }
    for (int i = 0; i < NB; ++i) vstore(c_rows[i], vadd(vload(c_rows[i]), Vec{_mm512_add_ps(acc[i], acc2[i])}));
  }
}

template <bool HU>
LOWRANK_BF16_DOT inline void block_dp_dispatch(int nb, const bf16_t* xr, int64_t ldx, const float* xt, int64_t xs,
                                               int64_t kb, const uint32_t* yp, int64_t Rp,
                                               const float* const* u_rows, float* const* c_rows, float* d) {
  with_count<8>(nb, [&](auto n) LOWRANK_BF16_DOT {
    block_dp<decltype(n)::value, HU>(xr, ldx, xt, xs, kb, yp, Rp, u_rows, c_rows, d);
  });
}
#define LOWRANK_DP_TARGET LOWRANK_BF16_DOT
#else
#define LOWRANK_DP_TARGET
#endif

// Rows [m0, m1) x columns [k0, k1) of x into p.c (rows m0..m1) and the d slice `d` ([K, Rp]).
template <class T, bool HY, bool HU, bool DP>
LOWRANK_DP_TARGET void run_range(const Plan& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1, float* d) {
  const Matrix& X = p.a->x;
  const T* x = X.data<T>();
  alignas(64) float tile[MB * KB];
  for (int64_t kb0 = k0; kb0 < k1; kb0 += KB) {
    const int64_t kb = min64(KB, k1 - kb0);
    for (int64_t mb0 = m0; mb0 < m1; mb0 += MB) {
      const int nb = int(min64(MB, m1 - mb0));
      const float* xt = nullptr;
      int64_t xs = 0;
      if constexpr (std::is_same<T, float>::value) {
        xt = x + mb0 * X.ld + kb0;
        xs = X.ld;
      } else if (!DP || HU) {  // DP reads x as it is for c; d's products want it widened
        for (int i = 0; i < nb; ++i) widen(tile + i * KB, x + (mb0 + i) * X.ld + kb0, kb);
        xt = tile;
        xs = KB;
      }
      for (int64_t r0 = 0; r0 < p.Rp; r0 += W) {
        const float* u_rows[MB];
        float* c_rows[MB];
        for (int i = 0; i < nb; ++i) {
          u_rows[i] = HU ? p.u + (mb0 + i) * p.ldu + r0 : nullptr;
          c_rows[i] = HY ? p.c + (mb0 + i) * p.Rp + r0 : nullptr;
        }
        float* dk = HU ? d + kb0 * p.Rp + r0 : nullptr;
#if defined(__AVX512F__)
        if constexpr (DP && std::is_same<T, bf16_t>::value) {
          block_dp_dispatch<HU>(nb, x + mb0 * X.ld + kb0, X.ld, xt, xs, kb, p.yp + kb0 / 2 * p.Rp + r0, p.Rp,
                                u_rows, c_rows, dk);
          continue;
        }
#endif
        block_dispatch<HY, HU>(nb, xt, xs, kb, HY ? p.y + kb0 * p.ldy + r0 : nullptr, p.ldy, u_rows, c_rows, dk,
                               p.Rp);
      }
    }
  }
}

template <class TO>
void write_c(const Plan& p, int64_t m0, int64_t m1) {
  const Matrix& C = p.a->c;
  const float s = p.a->scale;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t r = 0; r < p.R; ++r) store_scalar(C.data<TO>() + m * C.ld + r, s * p.c[m * p.Rp + r]);
}

// d over k in [k0, k1): the sum of `slices` partials (in task order), scaled, in d's dtype and layout, a
// vector of r at a time (element by element it had cost ~30 us of a 1536 x 16 d, more than the
// products at a few rows). Transposed, W values of k at a time go through a buffer to D's rows.
template <class TO>
void write_d(const Plan& p, int64_t slices, int64_t k0, int64_t k1) {
  const Matrix& D = p.a->d;
  const Vec s = vset1(p.a->scale);
  const int64_t stride = p.K * p.Rp;
  auto sum_at = [&](int64_t k, int64_t r0) {
    Vec v = vzero();
    for (int64_t t = 0; t < slices; ++t) v = vadd(v, vload(p.d + t * stride + k * p.Rp + r0));
    return vmul(s, v);
  };
  if (!p.a->d_transposed) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t r0 = 0; r0 < p.R; r0 += W) {
        TO* at = D.data<TO>() + k * D.ld + r0;
        if (r0 + W <= p.R)
          vstore(at, sum_at(k, r0));
        else
          vstore_n(at, sum_at(k, r0), p.R - r0);
      }
    return;
  }
  alignas(64) float buf[W][W];  // [r - r0][k - kb0]
  for (int64_t kb0 = k0; kb0 < k1; kb0 += W) {
    const int64_t nk = min64(W, k1 - kb0);
    for (int64_t r0 = 0; r0 < p.R; r0 += W) {
      const int64_t nr = min64(W, p.R - r0);
      for (int64_t j = 0; j < nk; ++j) {
        alignas(64) float col[W];
        vstore(col, sum_at(kb0 + j, r0));
        for (int64_t i = 0; i < nr; ++i) buf[i][j] = col[i];
      }
      for (int64_t i = 0; i < nr; ++i) {
        TO* at = D.data<TO>() + (r0 + i) * D.ld + kb0;
        if (nk == W)
          vstore(at, vload(buf[i]));
        else
          vstore_n(at, vload(buf[i]), nk);
      }
    }
  }
}

template <class T, class TC, class TD, bool HY, bool HU, bool DP>
struct Job {
  const Plan* p;

  LOWRANK_DP_TARGET void compute(int64_t t) const {
    const Plan& P = *p;
    if (P.split_rows) {
      const int64_t blocks = (P.M + MB - 1) / MB;
      const int64_t m0 = min64(P.M, blocks * t / P.tasks * MB), m1 = min64(P.M, blocks * (t + 1) / P.tasks * MB);
      float* d = HU ? P.d + t * P.K * P.Rp : nullptr;
      if (HU) std::memset(d, 0, sizeof(float) * size_t(P.K * P.Rp));
      if (HY) std::memset(P.c + m0 * P.Rp, 0, sizeof(float) * size_t((m1 - m0) * P.Rp));
      run_range<T, HY, HU, DP>(P, m0, m1, 0, P.K, d);
      if (HY) write_c<TC>(P, m0, m1);
    } else {  // d alone: k ranges of one slice, written out by the task that made them
      const int64_t k0 = P.K * t / P.tasks, k1 = P.K * (t + 1) / P.tasks;
      std::memset(P.d + k0 * P.Rp, 0, sizeof(float) * size_t((k1 - k0) * P.Rp));
      run_range<T, HY, HU, DP>(P, 0, P.M, k0, k1, P.d);
      write_d<TD>(P, 1, k0, k1);
    }
  }

  void reduce(int64_t chunk) const {
    const Plan& P = *p;
    const int64_t k0 = chunk * 256, k1 = min64(P.K, k0 + 256);
    write_d<TD>(P, P.tasks, k0, k1);
  }

  static void compute_task(void* ctx, int64_t t) { static_cast<const Job*>(ctx)->compute(t); }
  static void reduce_task(void* ctx, int64_t c) { static_cast<const Job*>(ctx)->reduce(c); }
};

template <class T, class TC, class TD, bool HY, bool HU, bool DP = false>
void run_job(const Plan& p, int num_threads) {
  using J = Job<T, TC, TD, HY, HU, DP>;
  J job{&p};
  parallel_for(p.tasks, num_threads, &J::compute_task, &job);
  if (HU && p.split_rows) parallel_for((p.K + 255) / 256, num_threads, &J::reduce_task, &job);
}

template <class T, class TC, class TD>
void run_typed(const Plan& p, int num_threads) {
  if constexpr (std::is_same<T, bf16_t>::value) {
    if (p.yp && p.u) return run_job<T, TC, TD, true, true, true>(p, num_threads);
    if (p.yp) return run_job<T, TC, TD, true, false, true>(p, num_threads);
  }
  if (p.y && p.u) return run_job<T, TC, TD, true, true>(p, num_threads);
  if (p.y) return run_job<T, TC, TD, true, false>(p, num_threads);
  return run_job<T, TC, TD, false, true>(p, num_threads);
}

template <class T>
void run_x(const Plan& p, int num_threads) {
  const bool c16 = p.a->c.ptr && p.a->c.dtype == DType::bfloat16;
  const bool d16 = p.a->d.ptr && p.a->d.dtype == DType::bfloat16;
  if (c16) return d16 ? run_typed<T, bf16_t, bf16_t>(p, num_threads) : run_typed<T, bf16_t, float>(p, num_threads);
  return d16 ? run_typed<T, float, bf16_t>(p, num_threads) : run_typed<T, float, float>(p, num_threads);
}

// A [rows, R] operand as fp32 rows of Rp lanes: the original when it already is one, else a padded copy.
const float* padded(const Matrix& m, bool transposed, int64_t rows, int64_t R, int64_t Rp, float* scratch,
                    int64_t* ld) {
  if (!transposed && m.dtype == DType::float32 && R == Rp) {
    *ld = m.ld;
    return m.data<float>();
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* row = scratch + i * Rp;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t at = transposed ? r * m.ld + i : i * m.ld + r;
      row[r] = m.dtype == DType::float32 ? m.data<float>()[at] : bf16_to_float(m.data<bf16_t>()[at]);
    }
    for (int64_t r = R; r < Rp; ++r) row[r] = 0.f;
  }
  *ld = Rp;
  return scratch;
}

// A bf16 [K, R] operand (or [R, K], transposed) as pairs of k for block_dp: [ceil(K / 2), Rp] 32-bit
// lanes, y[2j, r] in the low half, zero past R and past an odd K; in a per-thread buffer kept between calls.
const uint32_t* bf16_pairs(const Matrix& m, bool transposed, int64_t K, int64_t R, int64_t Rp) {
  const int64_t kp = (K + 1) / 2, ld = m.ld;
  thread_local std::vector<uint32_t> pairs;
  if (pairs.size() < size_t(kp * Rp)) pairs.resize(size_t(kp * Rp));
  const bf16_t* y = m.data<bf16_t>();
  uint32_t* yp = pairs.data();
  std::memset(yp, 0, sizeof(uint32_t) * size_t(kp * Rp));
  if (!transposed) {  // rows k = 2j and 2j + 1, interleaved
    for (int64_t j = 0; j < kp; ++j) {
      const bf16_t* lo = y + 2 * j * ld;
      uint32_t* out = yp + j * Rp;
      if (2 * j + 1 < K) {
        const bf16_t* hi = lo + ld;
        for (int64_t r = 0; r < R; ++r) out[r] = uint32_t(lo[r]) | (uint32_t(hi[r]) << 16);
      } else {
        for (int64_t r = 0; r < R; ++r) out[r] = lo[r];
      }
    }
  } else {  // a pair is two neighbours in row r
    for (int64_t r = 0; r < R; ++r) {
      const bf16_t* row = y + r * ld;
      for (int64_t j = 0; j < K / 2; ++j) yp[j * Rp + r] = uint32_t(row[2 * j]) | (uint32_t(row[2 * j + 1]) << 16);
      if (K % 2) yp[(kp - 1) * Rp + r] = row[K - 1];
    }
  }
  return yp;
}

// ---- adapter_term: out = bias + scale · col_scale ⊙ u eᵀ ----------------------------------
// The bf16 many-token paths' adapter term (lora.h), computed before the base GEMM accumulates onto it.
// An outer-product tile: TM rows of u (broadcast) against 2W columns of eᵀ (fp32), R steps of 2·TM
// FMAs on 2·TM accumulators. eᵀ is read in place where it comes fp32 and transposed; else its full
// panels are built once per call in the thread's scratch. The last, partial, column panel always comes
// from scratch, zero-padded, so no load passes the end of a row.
// (At 512 x 1536, Zen 4: 0.20 ms at r = 16 against 0.33 for torch's fp32 GEMM and a bf16 copy, and
// the split 16-bit GEMM it replaced; Zen 5, r = 256: ~74 % of the FMA peak.)
constexpr int TM = W == 16 ? 8 : 4;

struct TermPlan {
  const AdapterTermArgs* a;
  const float* et;    // eᵀ, [R, ld_et] fp32: every full panel of 2W columns
  int64_t ld_et;
  const float* tail;  // [R, 2W] fp32, the last partial panel zero-padded (nullptr when N % 2W == 0)
  int64_t blocks;     // row blocks of TM
  int64_t tasks;
};

// out[0, 2W) = lo, hi rounded as float_to_bf16 does. With AVX512-BF16 (the avx512bf16 variant), one
// vcvtne2ps2bf16 for both: it rounds the same way (nearest even, NaN quieted the same) but flushes
// subnormal inputs to zero, so a pair that holds one goes the exact way.
inline void store_pair(bf16_t* out, Vec lo, Vec hi) {
#if defined(__AVX512BF16__)
  if ((_mm512_fpclass_ps_mask(lo.v, 0x20) | _mm512_fpclass_ps_mask(hi.v, 0x20)) == 0) {
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi.v, lo.v));
    return;
  }
#endif
  vstore(out, lo);
  vstore(out + W, hi);
}
inline void store_pair(float* out, Vec lo, Vec hi) {
  vstore(out, lo);
  vstore(out + W, hi);
}

// The columns [n, N) of nb rows of out from their sums (rows of 2W floats in `sums`); out points at the
// first row's column n.
template <class TO, class TB>
void term_tail(const AdapterTermArgs& A, const float* sums, int nb, TO* out, int64_t n) {
  const TB* bias = A.bias.ptr ? A.bias.data<TB>() : nullptr;
  const float* cs = A.col_scale.ptr ? A.col_scale.data<float>() : nullptr;
  for (int i = 0; i < nb; ++i)
    for (int64_t c = 0; c < A.out.cols - n; ++c) {
      float v = (cs ? A.scale * cs[n + c] : A.scale) * sums[i * 2 * W + c];
      if (bias) v += load_scalar(bias + n + c);
      store_scalar(out + i * A.out.ld + c, v);
    }
}

// Rows [mb, mb + NB) of out, columns [n, n + 2W) (fewer at the right edge).
template <int NB, class TO, class TB>
void term_tile(const TermPlan& p, int64_t mb, int64_t n) {
  const AdapterTermArgs& A = *p.a;
  const int64_t N = A.out.cols, R = A.u.cols;
  const float* u = A.u.data<float>() + mb * A.u.ld;
  const TB* bias = A.bias.ptr ? A.bias.data<TB>() : nullptr;
  const float* cs = A.col_scale.ptr ? A.col_scale.data<float>() : nullptr;
  TO* out = A.out.data<TO>() + mb * A.out.ld;
  const int64_t ldu = A.u.ld, ldo = A.out.ld;  // locals: the stores below may alias anything
  const Vec s = vset1(A.scale);
  const bool full = n + 2 * W <= N;
  Vec acc[NB][2];
  for (int i = 0; i < NB; ++i) acc[i][0] = acc[i][1] = vzero();
  const float* e = full ? p.et + n : p.tail;
  const int64_t ld = full ? p.ld_et : 2 * W;
  for (int64_t j = 0; j < R; ++j, e += ld) {
    const Vec e0 = vload(e), e1 = vload(e + W);
    for (int i = 0; i < NB; ++i) {
      const Vec ub = vset1(u[i * ldu + j]);
      acc[i][0] = vfma(ub, e0, acc[i][0]);
      acc[i][1] = vfma(ub, e1, acc[i][1]);
    }
  }
  if (full) {  // (unrolled: an indexed acc would live on the stack; with it, and the stores above, the
               // term at 512 x 1536, r = 16, went from 94 to 70 us on a Zen 5)
    const Vec sc0 = cs ? vmul(s, vload(cs + n)) : s, sc1 = cs ? vmul(s, vload(cs + n + W)) : s;
    const Vec bv0 = bias ? vload(bias + n) : vzero(), bv1 = bias ? vload(bias + n + W) : vzero();
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) store_pair(out + i * ldo + n, vfma(sc0, acc[i][0], bv0), vfma(sc1, acc[i][1], bv1));
  } else {  // the last columns: through a buffer, element by element
    alignas(64) float tail[NB][2 * W];
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) {
      vstore(tail[i], acc[i][0]);
      vstore(tail[i] + W, acc[i][1]);
    }
    term_tail<TO, TB>(A, tail[0], NB, out + n, n);
  }
}

// eᵀ's columns [0, full) in fp32, as rows of `full` floats: e [N, R] (or [R, N], transposed: widened a row
// at a time). [N, R] is transposed in 16 x 64 blocks, so each block writes 64 rows of eᵀ a cache line
// each (element by element over all of e, the writes strided by N, it had cost more than the products:
// 1.7 ms of VeRA's 1536 x 256 term at M = 16 on a Zen 5). A 1536 x 16 bf16 e takes ~11 us here, the
// fixed cost of the r = 16 term at few rows.
template <class TE>
void build_et(const TE* e, int64_t ld, bool transposed, int64_t R, int64_t full, float* et) {
  if (transposed) {
    for (int64_t j = 0; j < R; ++j) widen(et + j * full, e + j * ld, full);
    return;
  }
  for (int64_t n0 = 0; n0 < full; n0 += 16)
    for (int64_t j0 = 0; j0 < R; j0 += 64) {
      const int64_t n1 = min64(full, n0 + 16), j1 = min64(R, j0 + 64);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t n = n0; n < n1; ++n) et[j * full + n] = load_scalar(e + n * ld + j);
    }
}

// Rows [m0, m1) of out. Column panels outermost: one panel of eᵀ (R x 2W floats, 32 KiB at R = 256
// with AVX-512) stays in L1 while every row block of the task passes it; the task's rows of u stay in
// L2. Row blocks outermost had streamed all of eᵀ (1.5 MiB at 1536 x 256) from L2/L3 once per 8 rows:
// VeRA's r = 256 term ran at ~35 G multiply-adds/s per core on a Zen 5.
template <class TO, class TB>
void term_rows(const TermPlan& p, int64_t m0, int64_t m1) {
  const int64_t N = p.a->out.cols;
  for (int64_t n = 0; n < N; n += 2 * W) {
    for (int64_t mb = m0; mb < m1; mb += TM) {
      with_count<8>(int(min64(TM, m1 - mb)), [&](auto k) { term_tile<decltype(k)::value, TO, TB>(p, mb, n); });
    }
  }
}

template <class TO, class TB>
void term_task(void* ctx, int64_t t) {
  const TermPlan& p = *static_cast<const TermPlan*>(ctx);
  const int64_t M = p.a->out.rows;
  term_rows<TO, TB>(p, min64(M, p.blocks * t / p.tasks * TM), min64(M, p.blocks * (t + 1) / p.tasks * TM));
}

}  // namespace

void adapter_term(const AdapterTermArgs& a, int num_threads) {
  const int64_t M = a.out.rows, N = a.out.cols, R = a.u.cols;
  TermPlan p{};
  p.a = &a;
  const int64_t full = N / (2 * W) * (2 * W);  // columns in full panels
  const bool in_place = a.e_transposed && a.e.dtype == DType::float32;
  // Scratch (kept between calls, see adapter_products): eᵀ's full panels in fp32 unless read in place,
  // then the zero-padded last panel.
  const int64_t built = in_place ? 0 : full, tail_n = full < N ? 2 * W : 0;
  thread_local std::vector<float> scratch;
  const size_t need = size_t(R * (built + tail_n));
  if (scratch.size() < need) scratch.resize(need);
  auto e_at = [&](int64_t j, int64_t n) {  // eᵀ[j, n] in fp32
    const int64_t at = a.e_transposed ? j * a.e.ld + n : n * a.e.ld + j;
    return a.e.dtype == DType::float32 ? a.e.data<float>()[at] : bf16_to_float(a.e.data<bf16_t>()[at]);
  };
  if (in_place) {
    p.et = a.e.data<float>();
    p.ld_et = a.e.ld;
  } else {
    float* et = scratch.data();
    if (a.e.dtype == DType::float32)
      build_et(a.e.data<float>(), a.e.ld, a.e_transposed, R, full, et);
    else
      build_et(a.e.data<bf16_t>(), a.e.ld, a.e_transposed, R, full, et);
    p.et = et;
    p.ld_et = full;
  }
  if (tail_n) {  // the last partial panel, zero-padded to 2W columns
    float* tail = scratch.data() + R * built;
    for (int64_t j = 0; j < R; ++j)
      for (int64_t c = 0; c < 2 * W; ++c) tail[j * 2 * W + c] = full + c < N ? e_at(j, full + c) : 0.f;
    p.tail = tail;
  }
  p.blocks = (M + TM - 1) / TM;
  const int64_t threads = num_threads < 1 ? 1 : num_threads;
  p.tasks = min64(threads, p.blocks);
  const bool o16 = a.out.dtype == DType::bfloat16, b16 = a.bias.ptr && a.bias.dtype == DType::bfloat16;
  void (*task)(void*, int64_t) = o16 ? (b16 ? &term_task<bf16_t, bf16_t> : &term_task<bf16_t, float>)
                                     : (b16 ? &term_task<float, bf16_t> : &term_task<float, float>);
  parallel_for(p.tasks, num_threads, task, &p);
}

void adapter_products(const AdapterProductsArgs& a, int num_threads) {
  Plan p{};
  p.a = &a;
  p.M = a.x.rows;
  p.K = a.x.cols;
  p.R = a.y.ptr ? (a.y_transposed ? a.y.rows : a.y.cols) : a.u.cols;
  p.Rp = (p.R + W - 1) / W * W;
  const bool want_c = a.y.ptr != 0, want_d = a.u.ptr != 0;
  p.split_rows = want_c;
  const int64_t threads = num_threads < 1 ? 1 : num_threads;
  p.tasks = p.split_rows ? min64(threads, (p.M + MB - 1) / MB) : min64(threads, (p.K + 63) / 64);
  if (p.tasks < 1) p.tasks = 1;
#if defined(__AVX512F__)
  // bf16 x against bf16 y: c's products on AVX512-BF16 (block_dp), y packed in pairs of k.
  const bool dp = want_c && a.x.dtype == DType::bfloat16 && a.y.dtype == DType::bfloat16 && cpu_has_bf16_dot();
#else
  const bool dp = false;
#endif
  // One scratch buffer per calling thread, kept between calls: fresh pages each call would cost more
  // than the products (the reason this kernel exists).
  thread_local std::vector<float> scratch;
  const int64_t y_n = want_c && !dp ? p.K * p.Rp : 0, u_n = want_d ? p.M * p.Rp : 0, c_n = want_c ? p.M * p.Rp : 0;
  const int64_t d_n = want_d ? (p.split_rows ? p.tasks : 1) * p.K * p.Rp : 0;
  const size_t need = size_t(y_n + u_n + c_n + d_n);
  if (scratch.size() < need) scratch.resize(need);
  float* s = scratch.data();
  if (dp) p.yp = bf16_pairs(a.y, a.y_transposed, p.K, p.R, p.Rp);
  p.y = y_n ? padded(a.y, a.y_transposed, p.K, p.R, p.Rp, s, &p.ldy) : nullptr;
  p.u = want_d ? padded(a.u, false, p.M, p.R, p.Rp, s + y_n, &p.ldu) : nullptr;
  p.c = want_c ? s + y_n + u_n : nullptr;
  p.d = want_d ? s + y_n + u_n + c_n : nullptr;
  if (a.x.dtype == DType::bfloat16) return run_x<bf16_t>(p, num_threads);
  run_x<float>(p, num_threads);
}

}  // namespace lowrank::cpu::LOWRANK_ISA
