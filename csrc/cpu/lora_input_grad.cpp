// The LoRA input gradient on the CPU, few-token path (compiled once per instruction set; simd.h).
//
//   out[m, k] = sum_n dy[m, n] * w[n, k]  +  sum_j g[m, j] * a[j, k]        (g = s·dy B, a = A)
//
//   dy [M, N] fp32    w [N, K] fp32/bf16    g [M, R] fp32    a [R, K] fp32 or w's dtype
//   out [M, K] fp32 or w's dtype; workspace [tasks*M, K] fp32 (one partial sum per task)
//
// dx = dy·W reads W by rows, like the forward, so it streams W once at M=1 instead of the strided
// walk a column split would need. The rows of [W; A] are split into `tasks` contiguous ranges; a
// task keeps its partial dx (M x K fp32: 16 KiB at M=1, 256 KiB at M=16, so L1/L2) and adds NB rows
// at a time: per k vector one load and one store of the partial for NB FMAs, with w read as a
// memory operand (NB=8 -> 9 loads per 8 FMAs). bf16 rows are widened once per K block when M > 1.
// Then the partials are summed column block by column block, and rounded once to out's dtype.
//
// A bf16 dy against a bf16 w, where the CPU has AVX512-BF16 (DotInputGradJob): vdpbf16ps multiplies
// 32 bf16 pairs per instruction, twice an fp32 FMA's multiply-adds on a Zen 4. Its pairs run along the
// sum, here n, which is w's row index: two rows' 32-column chunks are interleaved in registers
// (vpunpck{l,h}wd: one shuffle per 16 pairs) and multiplied by the broadcast pair (dy[m, n], dy[m, n+1]).
// The products of two bf16 values are exact; the sums are fp32, rounded once (vdpbf16ps reads denormal
// inputs as zero, as the forward's bf16 products do). A bf16 dy without those products is widened here.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "cpu/parallel_for.h"
#include "lora.h"

namespace lowrank::cpu::LOWRANK_ISA {
namespace {

constexpr int NB = 8;              // source rows folded into the partial per pass
constexpr int64_t KB = 1024;       // K block: NB rows x 4 KiB fp32 = 32 KiB, widened bf16 in L1/L2
constexpr int64_t REDUCE_COLS = 512;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// P[m, 0:kb] += sum_i c[i] * rows[i][0:kb] for one x row m. Rows are fp32 (or bf16 read directly
// when M == 1: each row is used once, and widening it first would only add stores).
// ahead (elements, 0: none): each row's data that far on is requested as the row is read, a vector at a
// time (fold_range: the first token row's pass requests the block read next).
template <int NBT, class T>
inline void fold_rows(float* P, const T* const* rows, const float* c, int64_t kb, int64_t ahead = 0) {
  constexpr int W = Vec::width;
  Vec cv[NBT];
  for (int i = 0; i < NBT; ++i) cv[i] = vset1(c[i]);
  int64_t k = 0;
  for (; k + W <= kb; k += W) {
    if (ahead)
      for (int i = 0; i < NBT; ++i) vprefetch(rows[i] + k + ahead);
    Vec acc = vload(P + k);
    for (int i = 0; i < NBT; ++i) acc = vfma(cv[i], vload(rows[i] + k), acc);
    vstore(P + k, acc);
  }
  for (; k < kb; ++k) {
    float acc = P[k];
    for (int i = 0; i < NBT; ++i) acc += c[i] * load_scalar(rows[i] + k);
    P[k] = acc;
  }
}

template <class T>
inline void fold_dispatch(int nb, float* P, const T* const* rows, const float* c, int64_t kb, int64_t ahead = 0) {
  switch (nb) {
    case 1: return fold_rows<1>(P, rows, c, kb, ahead);
    case 2: return fold_rows<2>(P, rows, c, kb, ahead);
    case 3: return fold_rows<3>(P, rows, c, kb, ahead);
    case 4: return fold_rows<4>(P, rows, c, kb, ahead);
    case 5: return fold_rows<5>(P, rows, c, kb, ahead);
    case 6: return fold_rows<6>(P, rows, c, kb, ahead);
    case 7: return fold_rows<7>(P, rows, c, kb, ahead);
    case 8: return fold_rows<8>(P, rows, c, kb, ahead);
  }
}

// P[M, K] += coef[:, r0:r1] · src[r0:r1, :]
template <class T>
void fold_range(float* P, int64_t M, int64_t K, const T* src, int64_t ld_src, const float* coef, int64_t ld_coef,
                int64_t r0, int64_t r1) {
  alignas(64) float wide[NB][KB];
  const bool widen_block = !std::is_same<T, float>::value && M > 1;
  for (int64_t n0 = r0; n0 < r1; n0 += NB) {
    const int nb = int(min64(NB, r1 - n0));
    const T* rows[NB];
    for (int i = 0; i < nb; ++i) rows[i] = src + (n0 + i) * ld_src;
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = min64(KB, K - k0);
      // Every token row passes over this block, from L1/L2 after the first; the first pass (or the
      // widening) requests the block read next (next_block_offset: 4096 -> 4096, one thread of a Zen 5:
      // fp32 M = 16 6.7 -> 4.8 ms; bf16 rows widened for a widened dy, M = 8, 4.6-4.7 -> 2.7-2.8 ms, AVX2
      // variant 5.7-6.4 -> 3.6 ms).
      const int64_t next = M == 1 ? 0 : next_block_offset(k0, k0 + kb, K, NB * ld_src, n0 + NB < r1);
      const float* wide_rows[NB];
      if (widen_block)
        for (int i = 0; i < nb; ++i) {
          widen_ahead(wide[i], rows[i] + k0, kb, next);
          wide_rows[i] = wide[i];
        }
      for (int64_t m = 0; m < M; ++m) {
        float c[NB];
        for (int i = 0; i < nb; ++i) c[i] = coef[m * ld_coef + n0 + i];
        float* Pm = P + m * K + k0;
        if (widen_block) {
          fold_dispatch(nb, Pm, wide_rows, c, kb);
        } else {
          const T* shifted[NB];
          for (int i = 0; i < nb; ++i) shifted[i] = rows[i] + k0;
          fold_dispatch(nb, Pm, shifted, c, kb, m == 0 ? next : 0);
        }
      }
    }
  }
}

// Task t of `tasks`: its partial sums (zeroed) and its virtual rows [v0, v1) of [w; a] (rows of w, then
// rows of a; ranges contiguous and balanced).
inline float* task_start(const LoraInputGradArgs& A, int64_t t, int64_t tasks, int64_t* v0, int64_t* v1) {
  const int64_t M = A.dy.rows, N = A.w.rows, K = A.w.cols, R = A.g.ptr ? A.g.cols : 0;
  float* P = A.workspace.data<float>() + t * M * K;
  for (int64_t i = 0; i < M * K; ++i) P[i] = 0.f;
  *v0 = (N + R) * t / tasks;
  *v1 = (N + R) * (t + 1) / tasks;
  return P;
}

// The adapter's rows among [v0, v1), after w's (the small terms first, then the large: g·A may be
// much larger than one row of dy·W).
template <class TA>
void fold_adapter_rows(const LoraInputGradArgs& A, float* P, int64_t v0, int64_t v1) {
  const int64_t N = A.w.rows;
  if (v1 > N)
    fold_range(P, A.dy.rows, A.w.cols, A.a.data<TA>(), A.a.ld, A.g.data<float>(), A.g.ld, (v0 > N ? v0 : N) - N,
               v1 - N);
}

template <class TW, class TA, class TO>
struct InputGradJob {
  const LoraInputGradArgs* p;
  int64_t tasks;

  void accumulate(int64_t t) const {
    const LoraInputGradArgs& A = *p;
    int64_t v0, v1;
    float* P = task_start(A, t, tasks, &v0, &v1);
    if (v0 < A.w.rows)
      fold_range(P, A.dy.rows, A.w.cols, A.w.data<TW>(), A.w.ld, A.dy.data<float>(), A.dy.ld, v0, min64(v1, A.w.rows));
    fold_adapter_rows<TA>(A, P, v0, v1);
  }

  void reduce(int64_t c) const {
    const LoraInputGradArgs& A = *p;
    const int64_t M = A.dy.rows, K = A.w.cols;
    const int64_t k0 = c * REDUCE_COLS, k1 = min64(K, k0 + REDUCE_COLS);
    const float* ws = A.workspace.data<float>();
    TO* out = A.out.data<TO>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = k0; k < k1; ++k) {
        float s = 0.f;
        for (int64_t t = 0; t < tasks; ++t) s += ws[(t * M + m) * K + k];
        store_scalar(out + m * A.out.ld + k, s);
      }
  }

  static void accumulate_task(void* ctx, int64_t t) { static_cast<const InputGradJob*>(ctx)->accumulate(t); }
  static void reduce_task(void* ctx, int64_t c) { static_cast<const InputGradJob*>(ctx)->reduce(c); }
};

#if defined(__AVX512F__)
constexpr int DOT_MB = 8;           // dy rows per register tile: 2 x 8 accumulators of 16 columns
constexpr int64_t DOT_ROWS = 128;   // w rows per chunk (fewer flushes of the partial sums than 32 or 64)
constexpr int64_t DOT_KB = 128;     // columns per block: its pairs, 128 rows x 128 x 2 B = 32 KiB, kept for later m tiles
constexpr int64_t DOT_AHEAD = 128;  // the next block's columns, prefetched into L2 by the first m tile

// Lane j of unpacklo(w0, w1) holds the pair (w0[k], w1[k]) for k = 8(j/4) + j%4, of unpackhi for
// k = 8(j/4) + 4 + j%4: these indices into (lo, hi) put columns 0-15 and 16-31 back in order.
alignas(64) constexpr int32_t kUnpackOrder[2][16] = {
    {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23},
    {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31}};

LOWRANK_BF16_DOT inline __m512bh dy_pair(const bf16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);  // (dy[n], dy[n+1]): low word, high word, as w's pairs
  return (__m512bh)_mm512_set1_epi32(v);
}

// P[0:MBT, 0:cols] += dy[0:MBT, n0:n1] · w[n0:n1, k0:k0+cols], one 32-column step (cols <= 32).
//
// The first m tile (Direct) reads w's rows, interleaves each pair of rows in registers, and, when more
// tiles follow, stores the pairs at `packed` ((lo, hi) of pair p at packed + 64p) for them: w's rows,
// 8 KiB apart in a 4096-wide bf16 w, all fall in one L1 set, so tiles re-reading them would evict each
// other's lines. An odd count's last row is paired with zeros and its dy with a zero word (dy is not
// read past n1); columns past cols are zeros and not stored.
template <int MBT, bool Direct>
LOWRANK_BF16_DOT void dot_step(float* P, int64_t ldp, const bf16_t* dy, int64_t ld_dy, const bf16_t* w, int64_t ld_w,
                               int64_t n0, int64_t n1, int64_t k0, int cols, bf16_t* packed, bool keep, bool ahead) {
  __m512 lo[MBT], hi[MBT];
  for (int m = 0; m < MBT; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  const __mmask32 wmask = cols >= 32 ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
  const int64_t full = (n1 - n0) / 2;
  auto pairs_of = [&](int64_t p, bool single, __m512bh& pl, __m512bh& ph) LOWRANK_BF16_DOT {
    if (Direct) {
      const bf16_t* r0 = w + (n0 + 2 * p) * ld_w + k0;
      if (ahead) {
        _mm_prefetch(reinterpret_cast<const char*>(r0 + DOT_AHEAD), _MM_HINT_T1);
        if (!single) _mm_prefetch(reinterpret_cast<const char*>(r0 + ld_w + DOT_AHEAD), _MM_HINT_T1);
      }
      const __m512i w0 = _mm512_maskz_loadu_epi16(wmask, r0);
      const __m512i w1 = single ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(wmask, r0 + ld_w);
      const __m512i l = _mm512_unpacklo_epi16(w0, w1), h = _mm512_unpackhi_epi16(w0, w1);
      if (keep) {
        _mm512_store_si512(packed + p * 64, l);
        _mm512_store_si512(packed + p * 64 + 32, h);
      }
      pl = (__m512bh)l;
      ph = (__m512bh)h;
    } else {
      pl = (__m512bh)_mm512_load_si512(packed + p * 64);
      ph = (__m512bh)_mm512_load_si512(packed + p * 64 + 32);
    }
  };
  for (int64_t p = 0; p < full; ++p) {
    __m512bh pl, ph;
    pairs_of(p, false, pl, ph);
    const bf16_t* d = dy + n0 + 2 * p;
    for (int m = 0; m < MBT; ++m) {
      const __m512bh dv = dy_pair(d + m * ld_dy);
      lo[m] = _mm512_dpbf16_ps(lo[m], pl, dv);
      hi[m] = _mm512_dpbf16_ps(hi[m], ph, dv);
    }
  }
  if (n0 + 2 * full < n1) {
    __m512bh pl, ph;
    pairs_of(full, true, pl, ph);
    for (int m = 0; m < MBT; ++m) {
      const __m512bh dv = (__m512bh)_mm512_set1_epi32(int32_t(dy[m * ld_dy + n1 - 1]));
      lo[m] = _mm512_dpbf16_ps(lo[m], pl, dv);
      hi[m] = _mm512_dpbf16_ps(hi[m], ph, dv);
    }
  }
  const __m512i i0 = _mm512_load_si512(kUnpackOrder[0]), i1 = _mm512_load_si512(kUnpackOrder[1]);
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xffff) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1);
  for (int m = 0; m < MBT; ++m) {
    float* out = P + m * ldp;
    const __m512 a0 = _mm512_permutex2var_ps(lo[m], i0, hi[m]), a1 = _mm512_permutex2var_ps(lo[m], i1, hi[m]);
    _mm512_mask_storeu_ps(out, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, out), a0));
    if (m1) _mm512_mask_storeu_ps(out + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, out + 16), a1));
  }
}

template <bool Direct>
LOWRANK_BF16_DOT void dot_step_dispatch(int mb, float* P, int64_t ldp, const bf16_t* dy, int64_t ld_dy, const bf16_t* w,
                                        int64_t ld_w, int64_t n0, int64_t n1, int64_t k0, int cols, bf16_t* packed,
                                        bool keep, bool ahead) {
  switch (mb) {
#define LOWRANK_DOT_CASE(MB) \
  case MB: return dot_step<MB, Direct>(P, ldp, dy, ld_dy, w, ld_w, n0, n1, k0, cols, packed, keep, ahead);
    LOWRANK_DOT_CASE(1) LOWRANK_DOT_CASE(2) LOWRANK_DOT_CASE(3) LOWRANK_DOT_CASE(4)
    LOWRANK_DOT_CASE(5) LOWRANK_DOT_CASE(6) LOWRANK_DOT_CASE(7) LOWRANK_DOT_CASE(8)
#undef LOWRANK_DOT_CASE
  }
}

// P[M, K] += dy[:, r0:r1] · w[r0:r1, :], DOT_ROWS rows by DOT_KB columns at a time: the first m tile
// reads w (and keeps the block's pairs when more tiles follow), the others read the kept pairs.
LOWRANK_BF16_DOT void dot_fold_range(float* P, int64_t M, int64_t K, const bf16_t* w, int64_t ld_w, const bf16_t* dy,
                                     int64_t ld_dy, int64_t r0, int64_t r1) {
  alignas(64) bf16_t packed[DOT_ROWS * DOT_KB];
  const bool keep = M > DOT_MB;
  const int mb0 = int(min64(DOT_MB, M));
  for (int64_t c0 = r0; c0 < r1; c0 += DOT_ROWS) {
    const int64_t c1 = min64(r1, c0 + DOT_ROWS), pairs = (c1 - c0 + 1) / 2;
    for (int64_t k0 = 0; k0 < K; k0 += DOT_KB) {
      const int64_t kb = min64(DOT_KB, K - k0);
      const bool ahead = k0 + DOT_KB < K;
      for (int64_t s = 0; s * 32 < kb; ++s)
        dot_step_dispatch<true>(mb0, P + k0 + s * 32, K, dy, ld_dy, w, ld_w, c0, c1, k0 + s * 32,
                                int(min64(32, kb - s * 32)), packed + s * pairs * 64, keep, ahead);
      for (int64_t m0 = DOT_MB; m0 < M; m0 += DOT_MB)
        for (int64_t s = 0; s * 32 < kb; ++s)
          dot_step_dispatch<false>(int(min64(DOT_MB, M - m0)), P + m0 * K + k0 + s * 32, K, dy + m0 * ld_dy, ld_dy,
                                   w, ld_w, c0, c1, k0 + s * 32, int(min64(32, kb - s * 32)), packed + s * pairs * 64,
                                   false, false);
    }
  }
}

// InputGradJob for a bf16 dy and w: the w rows by dot_fold_range, the adapter's rows (g is fp32) by
// fold_adapter_rows, as there.
template <class TA, class TO>
struct DotInputGradJob {
  const LoraInputGradArgs* p;
  int64_t tasks;

  LOWRANK_BF16_DOT void accumulate(int64_t t) const {
    const LoraInputGradArgs& A = *p;
    int64_t v0, v1;
    float* P = task_start(A, t, tasks, &v0, &v1);
    if (v0 < A.w.rows)
      dot_fold_range(P, A.dy.rows, A.w.cols, A.w.data<bf16_t>(), A.w.ld, A.dy.data<bf16_t>(), A.dy.ld, v0,
                     min64(v1, A.w.rows));
    fold_adapter_rows<TA>(A, P, v0, v1);
  }

  static void accumulate_task(void* ctx, int64_t t) { static_cast<const DotInputGradJob*>(ctx)->accumulate(t); }
  static void reduce_task(void* ctx, int64_t c) {
    // The same reduction as InputGradJob's: only p and tasks are read.
    const auto* job = static_cast<const DotInputGradJob*>(ctx);
    InputGradJob<bf16_t, TA, TO>{job->p, job->tasks}.reduce(c);
  }
};
#endif

template <class Job>
void run_job(const LoraInputGradArgs& a, int num_threads) {
  Job job{&a, a.workspace.rows / a.dy.rows};
  parallel_for(job.tasks, num_threads, &Job::accumulate_task, &job);
  const int64_t chunks = (a.w.cols + REDUCE_COLS - 1) / REDUCE_COLS;
  parallel_for(chunks, num_threads, &Job::reduce_task, &job);
}

template <class TW, class TA, class TO>
void run(const LoraInputGradArgs& a, int num_threads) {
  run_job<InputGradJob<TW, TA, TO>>(a, num_threads);
}

}  // namespace

// A bf16 dy takes the bf16 products where asked (bf16_dot), the kernel variant and the CPU have them and
// w is bf16 too; anywhere else it is widened here, once (M x N, into the thread's reused scratch), for
// the fp32 path.
void lora_input_grad(const LoraInputGradArgs& a_in, int num_threads) {
  LoraInputGradArgs a = a_in;
  const bool w_bf16 = a.w.dtype == DType::bfloat16;
  const bool a_bf16 = a.a.ptr ? a.a.dtype == DType::bfloat16 : w_bf16;
  const bool o_bf16 = a.out.dtype == DType::bfloat16;
  if (a.dy.dtype == DType::bfloat16) {
#if defined(__AVX512F__)
    if (a.bf16_dot && w_bf16 && cpu_has_bf16_dot()) {
      if (a_bf16) return o_bf16 ? run_job<DotInputGradJob<bf16_t, bf16_t>>(a, num_threads)
                                : run_job<DotInputGradJob<bf16_t, float>>(a, num_threads);
      return o_bf16 ? run_job<DotInputGradJob<float, bf16_t>>(a, num_threads)
                    : run_job<DotInputGradJob<float, float>>(a, num_threads);
    }
#endif
    const int64_t M = a.dy.rows, N = a.dy.cols;
    thread_local std::vector<float> dy32;
    if (dy32.size() < size_t(M * N)) dy32.resize(size_t(M * N));
    for (int64_t m = 0; m < M; ++m) widen(dy32.data() + m * N, a.dy.data<bf16_t>() + m * a.dy.ld, N);
    a.dy = Matrix{reinterpret_cast<std::uintptr_t>(dy32.data()), M, N, N, DType::float32, a.dy.device};
  }
  if (!w_bf16) return run<float, float, float>(a, num_threads);
  if (a_bf16) return o_bf16 ? run<bf16_t, bf16_t, bf16_t>(a, num_threads) : run<bf16_t, bf16_t, float>(a, num_threads);
  return o_bf16 ? run<bf16_t, float, bf16_t>(a, num_threads) : run<bf16_t, float, float>(a, num_threads);
}

}  // namespace lowrank::cpu::LOWRANK_ISA
