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
#include <cstdint>
#include <type_traits>

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
template <int NBT, class T>
inline void fold_rows(float* P, const T* const* rows, const float* c, int64_t kb) {
  constexpr int W = Vec::width;
  Vec cv[NBT];
  for (int i = 0; i < NBT; ++i) cv[i] = vset1(c[i]);
  int64_t k = 0;
  for (; k + W <= kb; k += W) {
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
inline void fold_dispatch(int nb, float* P, const T* const* rows, const float* c, int64_t kb) {
  switch (nb) {
    case 1: return fold_rows<1>(P, rows, c, kb);
    case 2: return fold_rows<2>(P, rows, c, kb);
    case 3: return fold_rows<3>(P, rows, c, kb);
    case 4: return fold_rows<4>(P, rows, c, kb);
    case 5: return fold_rows<5>(P, rows, c, kb);
    case 6: return fold_rows<6>(P, rows, c, kb);
    case 7: return fold_rows<7>(P, rows, c, kb);
    case 8: return fold_rows<8>(P, rows, c, kb);
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
      const float* wide_rows[NB];
      if (widen_block)
        for (int i = 0; i < nb; ++i) {
          widen(wide[i], rows[i] + k0, kb);
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
          fold_dispatch(nb, Pm, shifted, c, kb);
        }
      }
    }
  }
}

template <class TW, class TA, class TO>
struct InputGradJob {
  const LoraInputGradArgs* p;
  int64_t tasks;

  void accumulate(int64_t t) const {
    const LoraInputGradArgs& A = *p;
    const int64_t M = A.dy.rows, N = A.w.rows, K = A.w.cols, R = A.g.ptr ? A.g.cols : 0;
    float* P = A.workspace.data<float>() + t * M * K;
    for (int64_t i = 0; i < M * K; ++i) P[i] = 0.f;
    // Virtual rows [0, N + R): rows of w, then rows of a. Ranges are contiguous and balanced.
    const int64_t total = N + R;
    const int64_t v0 = total * t / tasks, v1 = total * (t + 1) / tasks;
    if (v0 < N)
      fold_range(P, M, K, A.w.data<TW>(), A.w.ld, A.dy.data<float>(), A.dy.ld, v0, min64(v1, N));
    if (v1 > N)
      fold_range(P, M, K, A.a.data<TA>(), A.a.ld, A.g.data<float>(), A.g.ld, (v0 > N ? v0 : N) - N, v1 - N);
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

template <class TW, class TA, class TO>
void run(const LoraInputGradArgs& a, int num_threads) {
  InputGradJob<TW, TA, TO> job{&a, a.workspace.rows / a.dy.rows};
  parallel_for(job.tasks, num_threads, &InputGradJob<TW, TA, TO>::accumulate_task, &job);
  const int64_t chunks = (a.w.cols + REDUCE_COLS - 1) / REDUCE_COLS;
  parallel_for(chunks, num_threads, &InputGradJob<TW, TA, TO>::reduce_task, &job);
}

}  // namespace

void lora_input_grad(const LoraInputGradArgs& a, int num_threads) {
  const bool w_bf16 = a.w.dtype == DType::bfloat16;
  const bool a_bf16 = a.a.ptr ? a.a.dtype == DType::bfloat16 : w_bf16;
  const bool o_bf16 = a.out.dtype == DType::bfloat16;
  if (!w_bf16) return run<float, float, float>(a, num_threads);
  if (a_bf16) return o_bf16 ? run<bf16_t, bf16_t, bf16_t>(a, num_threads) : run<bf16_t, bf16_t, float>(a, num_threads);
  return o_bf16 ? run<bf16_t, float, bf16_t>(a, num_threads) : run<bf16_t, float, float>(a, num_threads);
}

}  // namespace lowrank::cpu::LOWRANK_ISA
