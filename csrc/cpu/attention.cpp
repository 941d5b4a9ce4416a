// Causal grouped-query attention on the CPU, forward and backward (csrc/attention.h has the contract).
//
// Every product is one register-tiled kernel, bcast_gemm: C[r, c] (+)= Σ_k A(r, k) · B[k, c], with A
// read one scalar at a time through two strides (so A may be a transposed view: Pᵀ and dSᵀ) and
// broadcast against B's rows, c in the lanes. The operands are fp32 copies in per-thread scratch
// whose rows are padded to whole vectors, so no column tail needs masking:
//
//   forward, per (batch, query head), a block of query rows at a time:
//     S = (scale·Q) Kᵀ          (B = Kᵀ, [D, S])           masked, P = softmax(S) row by row
//     O = P V                   (B = V,  [S, D])           lse = max + log Σ exp, kept for the backward
//   backward, per (batch, key/value head) so dK and dV are one task's sums, its query heads in turn:
//     P = exp(S − lse)          (S recomputed as above)
//     dV += Pᵀ dO               (A = Pᵀ: strides swapped)
//     dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(P ⊙ dP))
//       (rowsum(P ⊙ dP) is rowsum(dO ⊙ O) with O unrounded: from the forward's bf16 O the difference
//       dP − rowsum cancels into errors of several bf16 ulps of dQ)
//     dQ = scale · dS K,  dK += dSᵀ (scale·Q)
//
// A block of query rows reads only the keys its last row sees; a row's masked keys get P = 0, so the
// products over the block's key range need no mask. Under a padding mask (kv_range) each sequence's keys
// past its range are neither loaded nor read, keys before it are masked like later ones, and a query row
// that sees no key gets P = 0, O = 0 and lse = −inf (torch SDPA's zeros). Each output is rounded once
// to the inputs' dtype.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "cpu/parallel_for.h"
#include "cpu/simd.h"

namespace lowrank::cpu::LOWRANK_ISA {
namespace {

constexpr int W = Vec::width;
constexpr int RT = 4;                    // rows of A per register tile
constexpr int CT = W == 16 ? 4 : 2;      // vectors of B per register tile (AVX2: 16 registers)
constexpr int64_t QB = 32;               // query rows per block
constexpr int64_t kFewRows = 8;          // fewer query rows: forward_few
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t pad(int64_t n) { return (n + W - 1) / W * W; }

template <int NR, int NV>
inline void tile(int64_t kdim, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  Vec acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(C + r * ldc + v * W) : vzero();
  for (int64_t k = 0; k < kdim; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * W);
    for (int r = 0; r < NR; ++r) {
      const Vec a = vset1(A[r * ars + k * aks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
}

template <int NR>
inline void tile_row(int64_t nv, int64_t kdim, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate) {
  int64_t v = 0;
  for (; v + CT <= nv; v += CT) tile<NR, CT>(kdim, A, ars, aks, B + v * W, ldb, C + v * W, ldc, accumulate);
  for (; v < nv; ++v) tile<NR, 1>(kdim, A, ars, aks, B + v * W, ldb, C + v * W, ldc, accumulate);
}

// C[r, c] (+)= Σ_{k < kdim} A[r·ars + k·aks] · B[k·ldb + c] for r < rows and c < pad(cols): B's and C's
// rows hold pad(cols) floats.
void bcast_gemm(int64_t rows, int64_t cols, int64_t kdim, const float* A, int64_t ars, int64_t aks, const float* B,
                int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t nv = pad(cols) / W;
  int64_t r = 0;
  for (; r + RT <= rows; r += RT) tile_row<RT>(nv, kdim, A + r * ars, ars, aks, B, ldb, C + r * ldc, ldc, accumulate);
  for (; r < rows; ++r) tile_row<1>(nv, kdim, A + r * ars, ars, aks, B, ldb, C + r * ldc, ldc, accumulate);
}

template <class T>
inline const T* at(const Strided4& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<const T*>(t.ptr) + a * t.s0 + b * t.s1 + c * t.s2;
}
template <class T>
inline T* at_mut(const Strided4& t, int64_t a, int64_t b, int64_t c) {
  return reinterpret_cast<T*>(t.ptr) + a * t.s0 + b * t.s1 + c * t.s2;
}

// rows [r0, r1) of head (b, h) of t as fp32 rows of ld floats (times mul), zero-padded past D; transposed
// stores column-major: out[d * ld + (r - r0)].
template <class T>
void load_rows(const Strided4& t, int64_t b, int64_t h, int64_t r0, int64_t r1, int64_t D, float mul, float* out,
               int64_t ld, bool transposed) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = at<T>(t, b, h, r);
    if (transposed) {
      for (int64_t d = 0; d < D; ++d) out[d * ld + (r - r0)] = load_scalar(src + d) * mul;
    } else {
      float* dst = out + (r - r0) * ld;
      for (int64_t d = 0; d < D; ++d) dst[d] = load_scalar(src + d) * mul;
      for (int64_t d = D; d < ld; ++d) dst[d] = 0.f;
    }
  }
}

template <class T>
void store_rows(const Strided4& t, int64_t b, int64_t h, int64_t r0, int64_t r1, int64_t D, const float* in,
                int64_t ld, float mul) {
  for (int64_t r = r0; r < r1; ++r) {
    T* dst = at_mut<T>(t, b, h, r);
    const float* src = in + (r - r0) * ld;
    for (int64_t d = 0; d < D; ++d) store_scalar(dst + d, src[d] * mul);
  }
}

struct Scratch {
  std::vector<float> kt, vt, k, v, q, o, s, p, dq, dk, dv, di;
  static Scratch& mine() {
    thread_local Scratch s;
    return s;
  }
  static float* sized(std::vector<float>& v, int64_t n) {
    if (v.size() < size_t(n)) v.resize(size_t(n));
    return v.data();
  }
};

// Batch b's visible keys: [start, end) under a padding mask, else [0, S).
struct KeyRange {
  int64_t start, end;
};
inline KeyRange key_range(const AttentionArgs& a, int64_t b) {
  if (!a.kv_range) return {0, a.S};
  const int64_t* r = reinterpret_cast<const int64_t*>(a.kv_range) + 2 * b;
  return {r[0], r[1]};
}

// One past the last key query row i (of T) sees: i + S - T, and none from the range's end on. The row sees
// keys [start, keys_seen): none when keys_seen <= start (a left pad).
inline int64_t keys_seen(int64_t i, int64_t T, int64_t S, KeyRange r) { return std::min(i + (S - T) + 1, r.end); }

// S = (scale·Q) Kᵀ for rows [i0, i1), masked: each row's keys before the range and from keys_seen on
// are −inf (up to pad(n)).
void scores(const float* q, int64_t ldq, const float* kt, int64_t lds, int64_t i0, int64_t i1, int64_t n,
            int64_t D, int64_t T, int64_t S, KeyRange r, float* s) {
  bcast_gemm(i1 - i0, n, D, q, ldq, 1, kt, lds, s, lds, false);
  for (int64_t i = i0; i < i1; ++i) {
    float* row = s + (i - i0) * lds;
    for (int64_t j = 0; j < std::min(r.start, pad(n)); ++j) row[j] = kNegInf;
    for (int64_t j = std::max(r.start, keys_seen(i, T, S, r)); j < pad(n); ++j) row[j] = kNegInf;
  }
}

// Few query rows (decode: one row over the whole cache): scores and output straight from K's and V's
// rows where they lie, with no fp32 copy of the head, whose cost (S·D per head, transposed) would be
// the call's (a 512-key cache: 770 against 30 µs for torch's SDPA before this path).
template <class T>
void forward_few(const AttentionArgs& a, int64_t b, int64_t h) {
  const int64_t S = a.S, D = a.D, Tq = a.T, ldd = pad(D), kvh = h / (a.H / a.KV);
  Scratch& w = Scratch::mine();
  float* q = Scratch::sized(w.q, ldd);
  float* o = Scratch::sized(w.o, ldd);
  float* s = Scratch::sized(w.s, S);
  float* lse = reinterpret_cast<float*>(a.lse) + (b * a.H + h) * Tq;
  const KeyRange r = key_range(a, b);
  for (int64_t i = 0; i < Tq; ++i) {
    const int64_t n = keys_seen(i, Tq, S, r);
    if (n <= r.start) {  // no key: zeros, as SDPA
      std::fill(o, o + ldd, 0.f);
      store_rows<T>(a.out, b, h, i, i + 1, D, o, ldd, 1.f);
      lse[i] = kNegInf;
      continue;
    }
    load_rows<T>(a.q, b, h, i, i + 1, D, a.scale, q, ldd, false);
    float mx = kNegInf;
    for (int64_t j = r.start; j < n; ++j) {
      s[j] = dot(q, at<T>(a.k, b, kvh, j), D);  // simd.h
      mx = std::max(mx, s[j]);
    }
    const Vec mv = vset1(mx);
    Vec sum = vzero();
    int64_t j = r.start;
    for (; j + W <= n; j += W) {
      const Vec e = vexp(vsub(vload(s + j), mv));
      vstore(s + j, e);
      sum = vadd(sum, e);
    }
    float total = vsum(sum);
    for (; j < n; ++j) total += (s[j] = exp1(s[j] - mx));
    std::fill(o, o + ldd, 0.f);
    for (int64_t j = r.start; j < n; ++j) {
      const T* vr = at<T>(a.v, b, kvh, j);
      const Vec p = vset1(s[j]);
      int64_t d = 0;
      for (; d + W <= D; d += W) vstore(o + d, vfma(p, vload(vr + d), vload(o + d)));
      for (; d < D; ++d) o[d] += s[j] * load_scalar(vr + d);
    }
    store_rows<T>(a.out, b, h, i, i + 1, D, o, ldd, 1.f / total);
    lse[i] = mx + std::log(total);
  }
}

template <class T>
void forward_head(const AttentionArgs& a, int64_t b, int64_t h) {
  if (a.T < kFewRows) return forward_few<T>(a, b, h);
  const int64_t S = a.S, D = a.D, Tq = a.T, lds = pad(S), ldd = pad(D), kvh = h / (a.H / a.KV);
  Scratch& w = Scratch::mine();
  float* kt = Scratch::sized(w.kt, D * lds);
  float* v = Scratch::sized(w.v, S * ldd);
  float* q = Scratch::sized(w.q, QB * ldd);
  float* s = Scratch::sized(w.s, QB * lds);
  float* o = Scratch::sized(w.o, QB * ldd);
  // Keys past the range's end are not loaded (kt's other columns stay 0: finite scores, masked; V's other
  // rows are never read, every product stopping at its block's last key). Keys before its start are
  // (masked: their probabilities are 0, against finite values).
  const KeyRange r = key_range(a, b);
  std::fill(kt, kt + D * lds, 0.f);
  load_rows<T>(a.k, b, kvh, 0, r.end, D, 1.f, kt, lds, /*transposed=*/true);
  load_rows<T>(a.v, b, kvh, 0, r.end, D, 1.f, v, ldd, false);
  float* lse = reinterpret_cast<float*>(a.lse) + (b * a.H + h) * Tq;
  for (int64_t i0 = 0; i0 < Tq; i0 += QB) {
    const int64_t i1 = std::min(Tq, i0 + QB), n = keys_seen(i1 - 1, Tq, S, r);
    load_rows<T>(a.q, b, h, i0, i1, D, a.scale, q, ldd, false);
    scores(q, ldd, kt, lds, i0, i1, n, D, Tq, S, r, s);
    for (int64_t i = i0; i < i1; ++i) {
      float* row = s + (i - i0) * lds;
      if (keys_seen(i, Tq, S, r) <= r.start) {  // no key: a zero row of P (zeros out, as SDPA)
        std::fill(row, row + pad(n), 0.f);
        lse[i] = kNegInf;
        continue;
      }
      Vec m = vset1(kNegInf);
      for (int64_t j = 0; j < pad(n); j += W) m = vmax(m, vload(row + j));
      const float mx = vhmax(m);
      const Vec mv = vset1(mx);
      Vec sum = vzero();
      for (int64_t j = 0; j < pad(n); j += W) {
        const Vec e = vexp(vsub(vload(row + j), mv));
        vstore(row + j, e);
        sum = vadd(sum, e);
      }
      const float total = vsum(sum);
      const Vec inv = vset1(1.f / total);
      for (int64_t j = 0; j < pad(n); j += W) vstore(row + j, vmul(vload(row + j), inv));
      lse[i] = mx + std::log(total);
    }
    bcast_gemm(i1 - i0, D, n, s, lds, 1, v, ldd, o, ldd, false);  // O = P V
    store_rows<T>(a.out, b, h, i0, i1, D, o, ldd, 1.f);
  }
}

template <class T>
void backward_group(const AttentionBackwardArgs& g, int64_t b, int64_t kvh) {
  const AttentionArgs& a = g.fwd;
  const int64_t S = a.S, D = a.D, Tq = a.T, lds = pad(S), ldd = pad(D), rep = a.H / a.KV;
  Scratch& w = Scratch::mine();
  float* kt = Scratch::sized(w.kt, D * lds);
  float* vt = Scratch::sized(w.vt, D * lds);
  float* k = Scratch::sized(w.k, S * ldd);
  float* q = Scratch::sized(w.q, QB * ldd);   // scale·Q
  float* o = Scratch::sized(w.o, QB * ldd);   // dO
  float* p = Scratch::sized(w.p, QB * lds);   // P
  float* s = Scratch::sized(w.s, QB * lds);   // dP, then dS
  float* dq = Scratch::sized(w.dq, QB * ldd);
  float* dk = Scratch::sized(w.dk, S * ldd);
  float* dv = Scratch::sized(w.dv, S * ldd);
  float* di = Scratch::sized(w.di, QB);
  const KeyRange r = key_range(a, b);  // keys outside it: no query sees them, their gradients stay 0
  std::fill(kt, kt + D * lds, 0.f);
  std::fill(vt, vt + D * lds, 0.f);
  std::fill(dk, dk + S * ldd, 0.f);
  std::fill(dv, dv + S * ldd, 0.f);
  load_rows<T>(a.k, b, kvh, 0, r.end, D, 1.f, kt, lds, true);
  load_rows<T>(a.v, b, kvh, 0, r.end, D, 1.f, vt, lds, true);
  load_rows<T>(a.k, b, kvh, 0, r.end, D, 1.f, k, ldd, false);
  for (int64_t h = kvh * rep; h < (kvh + 1) * rep; ++h) {
    const float* lse = reinterpret_cast<const float*>(a.lse) + (b * a.H + h) * Tq;
    for (int64_t i0 = 0; i0 < Tq; i0 += QB) {
      const int64_t i1 = std::min(Tq, i0 + QB), rows = i1 - i0, n = keys_seen(i1 - 1, Tq, S, r);
      load_rows<T>(a.q, b, h, i0, i1, D, a.scale, q, ldd, false);
      load_rows<T>(g.dout, b, h, i0, i1, D, 1.f, o, ldd, false);
      scores(q, ldd, kt, lds, i0, i1, n, D, Tq, S, r, p);
      for (int64_t i = i0; i < i1; ++i) {  // P = exp(S − lse): 0 where masked, and on a row with no key
        float* row = p + (i - i0) * lds;
        if (keys_seen(i, Tq, S, r) <= r.start) {
          std::fill(row, row + pad(n), 0.f);
          continue;
        }
        const Vec l = vset1(lse[i]);
        for (int64_t j = 0; j < pad(n); j += W) vstore(row + j, vexp(vsub(vload(row + j), l)));
      }
      bcast_gemm(n, D, rows, p, 1, lds, o, ldd, dv, ldd, true);   // dV += Pᵀ dO
      bcast_gemm(rows, n, D, o, ldd, 1, vt, lds, s, lds, false);  // dP = dO Vᵀ
      for (int64_t i = 0; i < rows; ++i) {  // di = rowsum(P ⊙ dP) (= rowsum(dO ⊙ O) unrounded), dS = P ⊙ (dP − di)
        float* ds = s + i * lds;
        const float* pr = p + i * lds;
        Vec acc = vzero();
        for (int64_t j = 0; j < pad(n); j += W) acc = vfma(vload(pr + j), vload(ds + j), acc);
        di[i] = vsum(acc);
        const Vec dv_i = vset1(di[i]);
        for (int64_t j = 0; j < pad(n); j += W) vstore(ds + j, vmul(vload(pr + j), vsub(vload(ds + j), dv_i)));
      }
      bcast_gemm(rows, D, n, s, lds, 1, k, ldd, dq, ldd, false);  // dQ = scale · dS K
      store_rows<T>(g.dq, b, h, i0, i1, D, dq, ldd, a.scale);
      bcast_gemm(n, D, rows, s, 1, lds, q, ldd, dk, ldd, true);   // dK += dSᵀ (scale·Q)
    }
  }
  store_rows<T>(g.dk, b, kvh, 0, S, D, dk, ldd, 1.f);
  store_rows<T>(g.dv, b, kvh, 0, S, D, dv, ldd, 1.f);
}

template <class T>
void forward_task(void* ctx, int64_t task) {
  const AttentionArgs& a = *static_cast<const AttentionArgs*>(ctx);
  forward_head<T>(a, task / a.H, task % a.H);
}

template <class T>
void backward_task(void* ctx, int64_t task) {
  const AttentionBackwardArgs& g = *static_cast<const AttentionBackwardArgs*>(ctx);
  backward_group<T>(g, task / g.fwd.KV, task % g.fwd.KV);
}

}  // namespace

void attention(const AttentionArgs& a, int num_threads) {
  AttentionArgs c = a;
  if (a.q.dtype == DType::bfloat16)
    parallel_for(a.B * a.H, num_threads, &forward_task<bf16_t>, &c);
  else
    parallel_for(a.B * a.H, num_threads, &forward_task<float>, &c);
}

void attention_backward(const AttentionBackwardArgs& a, int num_threads) {
  AttentionBackwardArgs c = a;
  if (a.fwd.q.dtype == DType::bfloat16)
    parallel_for(a.fwd.B * a.fwd.KV, num_threads, &backward_task<bf16_t>, &c);
  else
    parallel_for(a.fwd.B * a.fwd.KV, num_threads, &backward_task<float>, &c);
}

}  // namespace lowrank::cpu::LOWRANK_ISA
