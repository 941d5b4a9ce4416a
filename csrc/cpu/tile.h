// The NR x MR register tile shared by the CPU row kernels (lora.cpp, nf4.cpp): NR rows of w against
// MR rows of x, fp32 accumulation. Compiled per instruction set, like simd.h.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace lowrank::cpu::LOWRANK_ISA {

// NR x MR accumulators + NR w vectors must fit the register file (16 ymm for AVX2, 32 zmm).
// NR=4 rows gives four concurrent read streams per thread, which kept the hardware prefetcher busy
// enough to reach ~full bandwidth at M=1 here; MR=3 (AVX2) / 4 (AVX-512) fills the remaining registers.
constexpr int NR = 4;
#if defined(__AVX512F__)
constexpr int MR = 4;
#else
constexpr int MR = 3;
#endif
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// sums[i][m] += the lane sum of acc[i][m]: the tile's accumulators reduced together (vsums). V: Vec or
// the instruction set's raw register type.
template <int MRT, class V>
inline void add_tile_sums(const V (&acc)[NR][MRT], float sums[NR][MR]) {
  float total[NR * MRT];
  vsums<NR * MRT>(&acc[0][0], total);
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MRT; ++m) sums[i][m] += total[i * MRT + m];
}

// sums[i][m] += sum_{k in [k0, k1)} w_i[k] * x_m[k], x rows given by pointer (gathered rows need no copy).
// ahead (elements, 0: none): each w row's data that far on is prefetched as the row is read — at M = 1
// the w rows of a small layer are too short a stream for the hardware prefetcher (see lora.cpp).
template <int MRT, class TW>
inline void micro_tile_rows(const TW* const* wrow, const float* const* xrow, int64_t k0, int64_t k1,
                            float sums[NR][MR], int64_t ahead = 0) {
  constexpr int W = Vec::width;
  Vec acc[NR][MRT];
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MRT; ++m) acc[i][m] = vzero();
  int64_t k = k0;
  for (; k + W <= k1; k += W) {
    Vec wv[NR];
    if (ahead)
      for (int i = 0; i < NR; ++i) vprefetch(wrow[i] + k + ahead);
    for (int i = 0; i < NR; ++i) wv[i] = vload(wrow[i] + k);
    for (int m = 0; m < MRT; ++m) {
      Vec xv = vload(xrow[m] + k);
      for (int i = 0; i < NR; ++i) acc[i][m] = vfma(wv[i], xv, acc[i][m]);
    }
  }
  add_tile_sums(acc, sums);
  for (; k < k1; ++k)
    for (int i = 0; i < NR; ++i) {
      float wk = load_scalar(wrow[i] + k);
      for (int m = 0; m < MRT; ++m) sums[i][m] += wk * xrow[m][k];
    }
}

// The same over MRT consecutive x rows, ldx apart.
template <int MRT, class TW>
inline void micro_tile(const TW* const* wrow, const float* x, int64_t ldx, int64_t k0, int64_t k1,
                       float sums[NR][MR], int64_t ahead = 0) {
  const float* xrow[MRT];
  for (int m = 0; m < MRT; ++m) xrow[m] = x + m * ldx;
  micro_tile_rows<MRT>(wrow, xrow, k0, k1, sums, ahead);
}

template <class TW>
inline void tile_dispatch(int mr, const TW* const* wrow, const float* x, int64_t ldx, int64_t k0,
                          int64_t k1, float sums[NR][MR], int64_t ahead = 0) {
  switch (mr) {
    case 1: micro_tile<1>(wrow, x, ldx, k0, k1, sums, ahead); break;
    case 2: micro_tile<2>(wrow, x, ldx, k0, k1, sums, ahead); break;
    case 3: micro_tile<3>(wrow, x, ldx, k0, k1, sums, ahead); break;
#if defined(__AVX512F__)
    case 4: micro_tile<4>(wrow, x, ldx, k0, k1, sums, ahead); break;
#endif
  }
}

template <class TW>
inline void tile_dispatch_rows(int mr, const TW* const* wrow, const float* const* xrow, int64_t k0, int64_t k1,
                               float sums[NR][MR]) {
  switch (mr) {
    case 1: micro_tile_rows<1>(wrow, xrow, k0, k1, sums); break;
    case 2: micro_tile_rows<2>(wrow, xrow, k0, k1, sums); break;
    case 3: micro_tile_rows<3>(wrow, xrow, k0, k1, sums); break;
#if defined(__AVX512F__)
    case 4: micro_tile_rows<4>(wrow, xrow, k0, k1, sums); break;
#endif
  }
}

}  // namespace lowrank::cpu::LOWRANK_ISA
