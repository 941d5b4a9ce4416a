// Fused LoRA rows on the CPU (compiled once per instruction set; see simd.h).
//
//   out[m, n] = sum_k x[m, k] * w[n, k]  +  scale * c[n] * sum_j v[m, j] * s[j] * e[n, j]  +  bias[n]
//
//   x    [M, K]  fp32, or bf16: bf16 products against a bf16 w where the CPU has AVX512-BF16
//                (DotRowsJob), else widened here once (M*K is small)
//   w    [N, K]  fp32 or bf16, rows of the base weight W (or of A, for the down projection)
//   v    [M, R]  fp32, u = A x for the LoRA term (optional)
//   e    [N, R]  fp32 or bf16, rows of B (optional; VeRA's B[:out, :r] read in place through its ld)
//   c    [N]     fp32, per-column factor on the adapter term (optional; VeRA's b)
//   s    [R]     fp32, per-rank factor on v (optional; VeRA's d, so the caller's v = h = A_s x stays
//                unscaled; applied once to a copy of v, M x R)
//   bias [N]     w's dtype (optional)
//   out  [M, N]  fp32 or bf16; accumulation is fp32, one rounding at the end
//
// Memory-bound at M=1, where the whole job is to stream w once at the machine's read bandwidth, and
// FMA-bound from M~16 on. Work splits over tiles of NR rows of w; each tile keeps NR x MR fp32 vector
// accumulators in registers. When M > MR the K loop is blocked (KC) so the NR rows of the current
// block stay in L1 while every MR-row group of x passes over them; beyond 64 token rows, w is
// streamed again per 64 rows (run()). On AVX2 this beat torch's MKL GEMM at every M measured
// (ops/_runtime.py), so there it serves many tokens too. The adapter term runs the same register
// tiles over [v | e] (R long) right after the K loop, while the tile's NR rows of e are hot: at r=256
// and M=512 a plain dot per output (two loads per FMA, one reduction each) would cost ~10% of the
// base product, the tiles a few percent.
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/parallel_for.h"
#include "cpu/simd.h"
#include "cpu/tile.h"
#include "lora.h"

namespace lowrank::cpu::LOWRANK_ISA {

constexpr int64_t kRowsPerPass = 64;  // token rows per pass over w (see run())
constexpr int64_t KC = 1024;          // K block when M > MR: NR rows x 4 KiB (fp32) = 16 KiB of L1
// The same for bf16 x and w (DotRowsJob): NR rows x 4 KiB. With the next block prefetched
// (first_group_ahead), 4096 -> 4096 bf16 at M = 16 on one thread of a Zen 5 took 1.96-2.03 ms against
// 2.69-2.83 with KC and no prefetch (2.69-2.75 with 512, 2.39-2.42 with 4096; AMD EPYC, interleaved).
constexpr int64_t KC_DOT = 2048;
constexpr int64_t ROWS_PER_TASK = 64; // dynamic scheduling grain: 64 rows x 16 KiB = 1 MiB of fp32 W
constexpr int64_t kPrefetchRows = 8;  // M <= MR: w rows prefetched this far ahead (see run_rows)

// Row pointers of a tile of NR rows starting at row n0 of base (row stride ld); a short last tile
// (nr < NR) repeats row n0, whose results are not stored.
template <class T>
inline void tile_rows(const T* base, int64_t ld, int64_t n0, int nr, const T* rows[NR]) {
  for (int i = 0; i < NR; ++i) rows[i] = base + (n0 + (i < nr ? i : 0)) * ld;
}

// Past MR token rows a tile of NR rows of w is read per K block once per m-group, from L1 after the first
// group, whose pass requests the tile's next block (next_block_offset, through the loops' `ahead`); with
// one group (M <= MR) the only pass takes the rows' own `ahead`.
inline int64_t first_group_ahead(int64_t ld, int64_t n0, int64_t n_end, int64_t k0, int64_t k1, int64_t K,
                                 int64_t M, int64_t ahead) {
  return M <= MR ? ahead : next_block_offset(k0, k1, K, NR * ld, n0 + NR < n_end);
}

// Zeroes the [m-group][row][m] sums of the M token rows.
inline void zero_sums(int64_t M, float (*sums)[NR][MR]) {
  for (int64_t g = 0; g * MR < M; ++g)
    for (int i = 0; i < NR; ++i)
      for (int m = 0; m < MR; ++m) sums[g][i][m] = 0.f;
}

// The end of one tile of NR rows of w (rows n0 .. n0 + nr): the adapter term sum_j v[m, j] e[n, j] by the
// same register tiles over [v | e] (R long) while the tile's NR rows of e are hot, then out = sums +
// scale * c[n] * adapter + bias, rounded once. Shared by RowsJob and DotRowsJob.
template <class TW, class TE, class TO>
inline void finish_tile(const LoraRowsArgs& A, int64_t n0, int nr, const float (*sums)[NR][MR]) {
  const int64_t M = A.x.rows, R = A.v.ptr ? A.v.cols : 0;
  const TW* bias = A.bias.ptr ? A.bias.data<TW>() : nullptr;
  const float* v = A.v.ptr ? A.v.data<float>() : nullptr;
  const TE* e = A.e.ptr ? A.e.data<TE>() : nullptr;
  const float* col_scale = A.col_scale.ptr ? A.col_scale.data<float>() : nullptr;
  TO* out = A.out.data<TO>();
  float adapter[(kRowsPerPass + MR - 1) / MR][NR][MR];  // sum_j v[m, j] * e[n, j]
  if (v) {
    const TE* erow[NR];
    tile_rows(e, A.e.ld, n0, nr, erow);
    zero_sums(M, adapter);
    for (int64_t m0 = 0, g = 0; m0 < M; m0 += MR, ++g)
      tile_dispatch(int(min64(MR, M - m0)), erow, v + m0 * A.v.ld, A.v.ld, 0, R, adapter[g]);
  }
  for (int i = 0; i < nr; ++i) {
    const int64_t n = n0 + i;
    const float b = bias ? load_scalar(bias + n) : 0.f;
    const float s = col_scale ? A.scale * col_scale[n] : A.scale;
    for (int64_t m = 0; m < M; ++m) {
      float y = sums[m / MR][i][m % MR];
      if (v) y += s * adapter[m / MR][i][m % MR];
      store_scalar(out + m * A.out.ld + n, y + b);
    }
  }
}

template <class TW, class TE, class TO>
struct RowsJob {
  const LoraRowsArgs* a;

  void run_rows(int64_t n_begin, int64_t n_end) const {
    const LoraRowsArgs& A = *a;
    const int64_t M = A.x.rows, K = A.x.cols;
    const float* x = A.x.data<float>();
    const TW* w = A.w.data<TW>();
    const int64_t kc = M <= MR ? (K > 0 ? K : 1) : KC;
    // bf16 rows re-read by more than one x-row group are widened once per K block (measured at
    // M=16, 4096x11008: 17.5 ms converting in the inner loop vs fp32's 11.7 ms).
    const bool widen_block = !std::is_same<TW, float>::value && M > MR;
    alignas(64) float wide[NR][KC];
    // One pass over w (M <= MR) with rows shorter than 16 KiB: each row's data kPrefetchRows rows on is
    // prefetched as it is read. Such rows are too short a stream for the hardware prefetcher from a
    // cold start. Weights read cold, M = 1, r = 16, Zen 4, 2 threads, interleaved (AVX-512 / AVX2
    // variants): bf16 576 -> 1536 0.185 -> 0.154 / 0.176 -> 0.129 ms, 576 -> 576 0.098 -> 0.081 /
    // 0.094 -> 0.066 ms, 4096 -> 4096 (8 KiB rows) 1.38 -> 1.32 / 1.38 -> 1.19 ms; fp32 576 -> 1536
    // 0.210 -> 0.192 ms. fp32 4096 -> 4096 (16 KiB rows, already at 33-36 GB/s) lost 3-6 % with it.
    const int64_t ahead = M <= MR && K * int64_t(sizeof(TW)) < (16 << 10) ? kPrefetchRows * A.w.ld : 0;

    for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
      const int nr = int(min64(NR, n_end - n0));
      const TW* wrow[NR];
      tile_rows(w, A.w.ld, n0, nr, wrow);
      float sums[(kRowsPerPass + MR - 1) / MR][NR][MR];  // [m-group][row][m]
      zero_sums(M, sums);
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = min64(K, k0 + kc);
        if (widen_block) {
          // Several x-row groups will pass over this block: widen bf16 to fp32 once, not per group, and
          // request the next block meanwhile (bf16 4096 -> 4096, fp32 x, M = 8, one thread of a Zen 5: AVX2
          // variant 4.7-5.3 -> 3.1-3.2 ms, AVX-512 3.6-3.8 -> 2.1-2.3 ms).
          const int64_t next = next_block_offset(k0, k1, K, NR * A.w.ld, n0 + NR < n_end);
          for (int i = 0; i < NR; ++i) widen_ahead(wide[i], wrow[i] + k0, k1 - k0, next);
          const float* wide_rows[NR] = {wide[0], wide[1], wide[2], wide[3]};
          for (int64_t m0 = 0, g = 0; m0 < M; m0 += MR, ++g)
            tile_dispatch(int(min64(MR, M - m0)), wide_rows, x + m0 * A.x.ld + k0, A.x.ld, 0, k1 - k0, sums[g]);
        } else {
          const int64_t first = first_group_ahead(A.w.ld, n0, n_end, k0, k1, K, M, ahead);
          for (int64_t m0 = 0, g = 0; m0 < M; m0 += MR, ++g)
            tile_dispatch(int(min64(MR, M - m0)), wrow, x + m0 * A.x.ld, A.x.ld, k0, k1, sums[g], g ? 0 : first);
        }
      }
      finish_tile<TW, TE, TO>(A, n0, nr, sums);
    }
  }

  static void task(void* ctx, int64_t t) {
    auto* job = static_cast<const RowsJob*>(ctx);
    const int64_t N = job->a->w.rows;
    const int64_t begin = t * ROWS_PER_TASK;
    job->run_rows(begin, min64(N, begin + ROWS_PER_TASK));
  }
};

#if defined(__AVX512F__)
// A bf16 x against a bf16 w where the CPU has AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds
// them into 16 fp32 sums per instruction — twice the multiply-adds per cycle of an fp32 FMA (273 against
// 136 per ns on one core of the Zen 4 VM: simd.h) — and both operands are read as they are, so lane i of
// a 32-wide chunk holds elements 2i and 2i+1 of w's row and of x's alike (no reordering). The products
// of two bf16 values are exact in fp32; the sums are fp32, rounded once at the end, as in the widened
// path (vdpbf16ps reads denormal inputs, below 1.2e-38, as zero). A row's last partial chunk is read
// with masked loads. The adapter term and the epilogue are finish_tile's, as RowsJob's.
template <int MRT>
LOWRANK_BF16_DOT inline void dot_tile(const bf16_t* const* wrow, const bf16_t* x, int64_t ldx, int64_t k0,
                                      int64_t k1, float sums[NR][MR], int64_t ahead) {
  __m512 acc[NR][MRT];
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MRT; ++m) acc[i][m] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    __m512i wv[NR];
    if (ahead)  // one line of each row per chunk (see RowsJob's ahead)
      for (int i = 0; i < NR; ++i) _mm_prefetch(reinterpret_cast<const char*>(wrow[i] + k + ahead), _MM_HINT_T0);
    for (int i = 0; i < NR; ++i) wv[i] = _mm512_loadu_si512(wrow[i] + k);
    for (int m = 0; m < MRT; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * ldx + k);
      for (int i = 0; i < NR; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)wv[i], (__m512bh)xv);
    }
  }
  if (k < k1) {  // the last, partial chunk: masked loads (zeros beyond k1 add nothing)
    const __mmask32 mask = (__mmask32(1) << (k1 - k)) - 1;
    __m512i wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = _mm512_maskz_loadu_epi16(mask, wrow[i] + k);
    for (int m = 0; m < MRT; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
      for (int i = 0; i < NR; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)wv[i], (__m512bh)xv);
    }
  }
  add_tile_sums(acc, sums);
}

LOWRANK_BF16_DOT inline void dot_dispatch(int mr, const bf16_t* const* wrow, const bf16_t* x, int64_t ldx,
                                          int64_t k0, int64_t k1, float sums[NR][MR], int64_t ahead) {
  switch (mr) {
    case 1: dot_tile<1>(wrow, x, ldx, k0, k1, sums, ahead); break;
    case 2: dot_tile<2>(wrow, x, ldx, k0, k1, sums, ahead); break;
    case 3: dot_tile<3>(wrow, x, ldx, k0, k1, sums, ahead); break;
    case 4: dot_tile<4>(wrow, x, ldx, k0, k1, sums, ahead); break;
  }
}

// RowsJob with a bf16 x and bf16 w products (dot_tile): the K loop blocked by KC when M > MR so the NR
// rows of the block stay in L1 (2 KiB each) while every MR-row group of x passes over them.
template <class TE, class TO>
struct DotRowsJob {
  const LoraRowsArgs* a;

  LOWRANK_BF16_DOT void run_rows(int64_t n_begin, int64_t n_end) const {
    const LoraRowsArgs& A = *a;
    const int64_t M = A.x.rows, K = A.x.cols;
    const bf16_t* x = A.x.data<bf16_t>();
    const bf16_t* w = A.w.data<bf16_t>();
    const int64_t kc = M <= MR ? (K > 0 ? K : 1) : KC_DOT;
    const int64_t ahead = M <= MR && K * int64_t(sizeof(bf16_t)) < (16 << 10) ? kPrefetchRows * A.w.ld : 0;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
      const int nr = int(min64(NR, n_end - n0));
      const bf16_t* wrow[NR];
      tile_rows(w, A.w.ld, n0, nr, wrow);
      float sums[(kRowsPerPass + MR - 1) / MR][NR][MR];  // [m-group][row][m]
      zero_sums(M, sums);
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = min64(K, k0 + kc);
        const int64_t first = first_group_ahead(A.w.ld, n0, n_end, k0, k1, K, M, ahead);
        for (int64_t m0 = 0, g = 0; m0 < M; m0 += MR, ++g)
          dot_dispatch(int(min64(MR, M - m0)), wrow, x + m0 * A.x.ld, A.x.ld, k0, k1, sums[g], g ? 0 : first);
      }
      finish_tile<bf16_t, TE, TO>(A, n0, nr, sums);
    }
  }

  static void task(void* ctx, int64_t t) {
    auto* job = static_cast<const DotRowsJob*>(ctx);
    const int64_t N = job->a->w.rows;
    const int64_t begin = t * ROWS_PER_TASK;
    job->run_rows(begin, min64(N, begin + ROWS_PER_TASK));
  }
};
#endif

template <class Job, class TO>
void run(const LoraRowsArgs& a_in, int num_threads) {
  // A per-rank scale on v (VeRA's d) is applied once, to a copy of v (M x R fp32, the size of v itself),
  // not inside the adapter tiles: there it cost a multiply per v load (measured M=512, 4096x4096,
  // r=256: adapter tiles 12.7 ms with the in-tile multiply).
  LoraRowsArgs a = a_in;
  std::vector<float> scaled_v;
  if (a.v.ptr && a.v_scale.ptr) {
    const int64_t M = a.v.rows, R = a.v.cols;
    scaled_v.resize(size_t(M * R));
    const float* v = a.v.data<float>();
    const float* s = a.v_scale.data<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < R; ++j) scaled_v[size_t(m * R + j)] = v[m * a.v.ld + j] * s[j];
    a.v.ptr = reinterpret_cast<std::uintptr_t>(scaled_v.data());
    a.v.ld = R;
    a.v_scale = Matrix{};
  }
  // More than kRowsPerPass token rows: one pass over w per block of rows. Streaming w again per 64
  // rows costs ~5 ms of DRAM traffic per pass (4096x11008 fp32) against ~40 ms of FMAs, and keeps
  // every block's x rows in L2 (measured M=512 fp32: 309 ms, vs 386 ms for torch's MKL GEMM).
  for (int64_t m0 = 0; m0 < a.x.rows; m0 += kRowsPerPass) {
    LoraRowsArgs part = a;
    const int64_t rows = min64(kRowsPerPass, a.x.rows - m0);
    part.x.rows = part.out.rows = rows;
    part.x.ptr += m0 * a.x.ld * (a.x.dtype == DType::bfloat16 ? sizeof(bf16_t) : sizeof(float));
    part.out.ptr += m0 * a.out.ld * sizeof(TO);
    if (a.v.ptr) {
      part.v.rows = rows;
      part.v.ptr += m0 * a.v.ld * sizeof(float);
    }
    Job job{&part};
    const int64_t n_tasks = (a.w.rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    parallel_for(n_tasks, num_threads, &Job::task, &job);
  }
}

template <class TW, class TE, class TO>
void run_widened(const LoraRowsArgs& a, int num_threads) {
  run<RowsJob<TW, TE, TO>, TO>(a, num_threads);
}

// Entry point for this instruction set; dtypes already validated by the caller. A bf16 x takes the
// bf16 products where the kernel variant and the CPU have them and w is bf16 too; anywhere else it is
// widened here, once (M x K), and runs the fp32-x path.
void lora_rows(const LoraRowsArgs& a_in, int num_threads) {
  LoraRowsArgs a = a_in;
  const bool w_bf16 = a.w.dtype == DType::bfloat16;
  const bool e_bf16 = a.e.ptr ? a.e.dtype == DType::bfloat16 : w_bf16;
  const bool o_bf16 = a.out.dtype == DType::bfloat16;
  std::vector<float> x32;
  if (a.x.dtype == DType::bfloat16) {
#if defined(__AVX512F__)
    if (w_bf16 && cpu_has_bf16_dot()) {
      if (o_bf16) return e_bf16 ? run<DotRowsJob<bf16_t, bf16_t>, bf16_t>(a, num_threads)
                                : run<DotRowsJob<float, bf16_t>, bf16_t>(a, num_threads);
      return e_bf16 ? run<DotRowsJob<bf16_t, float>, float>(a, num_threads)
                    : run<DotRowsJob<float, float>, float>(a, num_threads);
    }
#endif
    const int64_t M = a.x.rows, K = a.x.cols;
    x32.resize(size_t(M * K));
    for (int64_t m = 0; m < M; ++m) widen(x32.data() + m * K, a.x.data<bf16_t>() + m * a.x.ld, K);
    a.x = Matrix{reinterpret_cast<std::uintptr_t>(x32.data()), M, K, K, DType::float32, a.x.device};
  }
  if (!w_bf16) return run_widened<float, float, float>(a, num_threads);
  if (o_bf16) {
    if (e_bf16) return run_widened<bf16_t, bf16_t, bf16_t>(a, num_threads);
    return run_widened<bf16_t, float, bf16_t>(a, num_threads);
  }
  if (e_bf16) return run_widened<bf16_t, bf16_t, float>(a, num_threads);
  return run_widened<bf16_t, float, float>(a, num_threads);
}


}  // namespace lowrank::cpu::LOWRANK_ISA
