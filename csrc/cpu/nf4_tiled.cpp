// NF4 few-token inference over the tiled layout (nf4.h, "the inference layout"): one 512-bit lane per
// output row, so x is broadcast and a register accumulates 16 rows' sums at once.
//
// Why a second layout. The row-major kernel (nf4.cpp, dot_rows) puts K in the lanes: every row's sums end
// in a horizontal reduction, and every tile of two W rows re-reads its x rows (at K = 4096, 16 rows of x
// are 128 KiB: an L2 stream per row pair). Here a 64-byte load holds 16 rows x 8 columns; the eight
// shift-and-vpermps lookups of the M = 1 kernel give them as fp32, lane j of vector 2p + h being row
// 8h + j/2 at column 2p + j%2. Times the rows' block scales (two vectors per block, spread from the 16
// decoded ones) that is exact W, in fp32:
//   bf16 x:  vcvtne2ps2bf16 of the h = 0 and h = 1 vectors of pair p is W rounded once to bf16, dword j =
//            row j at columns (2p, 2p+1): one vdpbf16ps per x row against the broadcast bf16 pair
//            x[2p], x[2p+1] adds 32 products to the 16 rows' sums (fp32 accumulation: nf4_rows' contract).
//   fp32 x:  each vector's lanes alternate columns 2p, 2p+1, so one FMA per x row against x[2p], x[2p+1]
//            broadcast as a pair; the two halves of a lane pair are added at the end.
// The decode (one load, 7 shifts, 8 vpermps, 8 multiplies, 4 conversions per 128 weights) is shared by up
// to 16 (bf16) or 8 (fp32) x rows held in registers. Needs AVX-512 (bf16 x: AVX512-BF16); the other
// variants compile stubs that raise, and ops/_dispatch.py never picks the layout where they would run.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/parallel_for.h"
#include "cpu/simd.h"
#include "nf4.h"

namespace lowrank::cpu::LOWRANK_ISA {

static const float kTileTable[16] = LOWRANK_NF4_TABLE;

// ---- making the tiles (any variant: plain C++, once per weight) -----------------------------------------
struct TileCtx {
  const Nf4Weight* w;
  const Nf4Tiled* p;
};

static inline uint8_t code_at(const Nf4Weight& w, int64_t row, int64_t col) {
  const int64_t f = row * w.cols + col;
  const uint8_t b = w.codes_ptr()[f >> 1];
  return (f & 1) ? (b & 0x0F) : uint8_t(b >> 4);
}

static void tile_task(void* ctx, int64_t t) {
  const TileCtx& c = *static_cast<TileCtx*>(ctx);
  const Nf4Weight& w = *c.w;
  const int64_t K = w.cols, N = w.rows, chunks = K / 8, nblk = K / w.blocksize;
  uint8_t* dst = reinterpret_cast<uint8_t*>(c.p->codes) + t * chunks * 64;
  std::vector<uint8_t> rows(size_t(16 * K), uint8_t(7));  // the tile's codes, one byte each (7: 0.0)
  for (int l = 0; l < 16; ++l) {
    const int64_t row = 16 * t + l;
    if (row >= N) break;
    for (int64_t k = 0; k < K; ++k) rows[size_t(l * K + k)] = code_at(w, row, k);
  }
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int j = 0; j < 16; ++j)
      for (int q = 0; q < 4; ++q) {
        const int64_t col = 8 * ch + 2 * q + (j & 1);
        const uint8_t lo = rows[size_t((j / 2) * K + col)], hi = rows[size_t((8 + j / 2) * K + col)];
        dst[ch * 64 + 4 * j + q] = uint8_t(lo | (hi << 4));
      }
  float* sc = reinterpret_cast<float*>(c.p->scales) + t * nblk * 16;
  for (int l = 0; l < 16; ++l) {
    const int64_t row = 16 * t + l;
    for (int64_t b = 0; b < nblk; ++b)
      sc[b * 16 + l] = row < N ? nf4_block_absmax(w, row * nblk + b) : 0.f;
  }
}

void nf4_tile(const Nf4Weight& w, const Nf4Tiled& p, int num_threads) {
  TileCtx c{&w, &p};
  parallel_for(p.tiles(), num_threads, tile_task, &c);
}

#if defined(__AVX512F__)
// Codes are requested this far ahead of the load (at most one tile's length): a weight read cold from
// memory needs it (4096 x 4096 at M = 1, 2 threads, Zen 4: 247 us at 512 bytes ahead, 179 at 16 KiB).
constexpr int64_t kTiledAhead = 16384;

struct TiledCtx {
  const Nf4TiledRowsArgs* a;
  int64_t tiles_per_task;
  const void* xs;  // x interleaved (interleave_x)
};

// lanes 2j, 2j + 1 <- scale of row j (h = 0) or 8 + j (h = 1)
inline void spread_scales(const float* s16, __m512& lo, __m512& hi) {
  const __m512 s = _mm512_loadu_ps(s16);
  lo = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), s);
  hi = _mm512_permutexvar_ps(_mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15), s);
}

// Vector 2p + h of a chunk: exact W (table[code] * absmax, fp32).
inline __m512 chunk_vector(__m512i d, int shift, __m512 table, __m512 scale) {
  return _mm512_mul_ps(_mm512_permutexvar_ps(shift ? _mm512_srli_epi32(d, shift) : d, table), scale);
}

// Sums of the tile's 16 rows for one x row (lane l = row 16t + l), plus the adapter term and the bias,
// rounded once into out. bt: the tile's e rows transposed ([R][16], fp32).
static void store_tile(const Nf4TiledRowsArgs& a, int64_t t, int64_t m, __m512 s, const float* bt) {
  const int64_t N = a.w.rows, n0 = 16 * t;
  const int valid = int(std::min<int64_t>(16, N - n0));
  const __mmask16 mask = valid == 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  if (a.v.ptr) {
    const float* v = a.v.data<float>() + m * a.v.ld;
    __m512 adapter = _mm512_setzero_ps();
    for (int64_t j = 0; j < a.v.cols; ++j)
      adapter = _mm512_fmadd_ps(_mm512_loadu_ps(bt + 16 * j), _mm512_set1_ps(v[j]), adapter);
    s = _mm512_fmadd_ps(adapter, _mm512_set1_ps(a.scale), s);
  }
  if (a.bias.ptr) {
    __m512 b;
    if (a.bias.dtype == DType::float32) {
      b = _mm512_maskz_loadu_ps(mask, a.bias.data<float>() + n0);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, a.bias.data<bf16_t>() + n0);
      b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    s = _mm512_add_ps(s, b);
  }
  if (a.out.dtype == DType::float32) {
    _mm512_mask_storeu_ps(a.out.data<float>() + m * a.out.ld + n0, mask, s);
  } else {
    _mm256_mask_storeu_epi16(a.out.data<bf16_t>() + m * a.out.ld + n0, mask, round_bf16(s));
  }
}

// e's rows of tile t, transposed to [R][16] fp32 (zero past the end).
static void transpose_e(const Nf4TiledRowsArgs& a, int64_t t, float* bt) {
  const int64_t R = a.v.cols, N = a.w.rows;
  for (int l = 0; l < 16; ++l) {
    const int64_t n = 16 * t + l;
    for (int64_t j = 0; j < R; ++j) {
      float e = 0.f;
      if (n < N)
        e = a.e.dtype == DType::float32 ? a.e.data<float>()[n * a.e.ld + j]
                                        : bf16_to_float(a.e.data<bf16_t>()[n * a.e.ld + j]);
      bt[j * 16 + l] = e;
    }
  }
}

// x rows [m0, m0 + MR) (block xb of interleave_x; rows past M are zeros, their sums not stored) against tile t.
// For up to 4 x rows the decode is most of the work: the table values are summed against x per block
// and the block's sums scaled once (sum_k t[q] x, then * absmax, as nf4.cpp's M = 1 kernel), which takes
// the 8 multiplies per chunk out of the loop; 8 x rows have no registers left for the block sums.
template <int MR>
static void tile_fp32(const Nf4TiledRowsArgs& a, int64_t t, int64_t m0, const float* xb, const float* bt) {
  const int64_t K = a.w.cols, M = a.x.rows, chunks = K / 8, cpb = a.w.blocksize / 8, nblk = K / a.w.blocksize;
  const uint8_t* codes = reinterpret_cast<const uint8_t*>(a.w.codes) + t * chunks * 64;
  const float* scales = reinterpret_cast<const float*>(a.w.scales) + t * nblk * 16;
  const int64_t ahead = std::min(kTiledAhead, chunks * 64);
  const __m512 table = _mm512_loadu_ps(kTileTable), one = _mm512_set1_ps(1.f);
  constexpr bool kScaleSums = MR <= 4;
  constexpr int S = MR >= 4 ? 1 : 4 / MR;  // independent sums per x row: the FMA chains' latency, hidden
  __m512 acc[MR][2], blk[MR][S][2];
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int i = 0; i < S; ++i) blk[m][i][0] = blk[m][i][1] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nblk; ++b) {
    __m512 slo, shi;
    spread_scales(scales + 16 * b, slo, shi);
    const __m512 wlo = kScaleSums ? one : slo, whi = kScaleSums ? one : shi;  // the scales inside W, or after
    for (int64_t ch = b * cpb; ch < (b + 1) * cpb; ++ch) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + 64 * ch + ahead), _MM_HINT_T0);
      const __m512i d = _mm512_loadu_si512(codes + 64 * ch);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        __m512 lo, hi;
        if (kScaleSums) {
          lo = _mm512_permutexvar_ps(p ? _mm512_srli_epi32(d, 8 * p) : d, table);
          hi = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 8 * p + 4), table);
        } else {
          lo = chunk_vector(d, 8 * p, table, wlo), hi = chunk_vector(d, 8 * p + 4, table, whi);
        }
        for (int m = 0; m < MR; ++m) {
          double pair;
          std::memcpy(&pair, xb + (ch * MR + m) * 8 + 2 * p, 8);
          const __m512 xp = _mm512_castpd_ps(_mm512_set1_pd(pair));  // x[2p], x[2p+1], repeated
          blk[m][p % S][0] = _mm512_fmadd_ps(lo, xp, blk[m][p % S][0]);
          blk[m][p % S][1] = _mm512_fmadd_ps(hi, xp, blk[m][p % S][1]);
        }
      }
    }
    if (kScaleSums) {
      for (int m = 0; m < MR; ++m) {
        for (int i = 1; i < S; ++i) {
          blk[m][0][0] = _mm512_add_ps(blk[m][0][0], blk[m][i][0]);
          blk[m][0][1] = _mm512_add_ps(blk[m][0][1], blk[m][i][1]);
        }
        acc[m][0] = _mm512_fmadd_ps(blk[m][0][0], slo, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(blk[m][0][1], shi, acc[m][1]);
        for (int i = 0; i < S; ++i) blk[m][i][0] = blk[m][i][1] = _mm512_setzero_ps();
      }
    }
  }
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int m = 0; m < MR && m0 + m < M; ++m) {
    if (!kScaleSums) {
      for (int i = 1; i < S; ++i) {
        blk[m][0][0] = _mm512_add_ps(blk[m][0][0], blk[m][i][0]);
        blk[m][0][1] = _mm512_add_ps(blk[m][0][1], blk[m][i][1]);
      }
      acc[m][0] = blk[m][0][0], acc[m][1] = blk[m][0][1];
    }
    const __m512 lo = _mm512_add_ps(acc[m][0], _mm512_permute_ps(acc[m][0], 0xB1));  // lane 2j: row j
    const __m512 hi = _mm512_add_ps(acc[m][1], _mm512_permute_ps(acc[m][1], 0xB1));  // lane 2j: row 8 + j
    store_tile(a, t, m0 + m, _mm512_permutex2var_ps(lo, evens, hi), bt);
  }
}

template <int MR>
LOWRANK_BF16_DOT static void tile_bf16(const Nf4TiledRowsArgs& a, int64_t t, int64_t m0, const bf16_t* xb,
                                       const float* bt) {
  const int64_t K = a.w.cols, M = a.x.rows, chunks = K / 8, cpb = a.w.blocksize / 8, nblk = K / a.w.blocksize;
  const uint8_t* codes = reinterpret_cast<const uint8_t*>(a.w.codes) + t * chunks * 64;
  const float* scales = reinterpret_cast<const float*>(a.w.scales) + t * nblk * 16;
  const int64_t ahead = std::min(kTiledAhead, chunks * 64);
  const __m512 table = _mm512_loadu_ps(kTileTable);
  constexpr int S = MR >= 8 ? 1 : MR == 4 ? 2 : 4;  // sums per x row: 8+ vdpbf16ps chains hide its latency
  __m512 acc[MR][S];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < S; ++i) acc[m][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    __m512 slo, shi;
    spread_scales(scales + 16 * b, slo, shi);
    for (int64_t ch = b * cpb; ch < (b + 1) * cpb; ++ch) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + 64 * ch + ahead), _MM_HINT_T0);
      const __m512i d = _mm512_loadu_si512(codes + 64 * ch);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m512 lo = chunk_vector(d, 8 * p, table, slo), hi = chunk_vector(d, 8 * p + 4, table, shi);
        const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);  // dword j: row j at columns 2p, 2p+1
        for (int m = 0; m < MR; ++m) {
          int32_t pair;
          std::memcpy(&pair, xb + (ch * MR + m) * 8 + 2 * p, 4);
          acc[m][p % S] = _mm512_dpbf16_ps(acc[m][p % S], wv, (__m512bh)_mm512_set1_epi32(pair));
        }
      }
    }
  }
  for (int m = 0; m < MR && m0 + m < M; ++m) {
    for (int i = 1; i < S; ++i) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][i]);
    store_tile(a, t, m0 + m, acc[m][0], bt);
  }
}

// x rows are taken in blocks of up to 16 (bf16) or 8 (fp32), each block's rows interleaved by chunk of 8
// columns ([chunks][mr][8], rows past M zero), so a tile kernel reads one sequential stream at fixed
// offsets (16 row pointers would not fit the registers: their reloads cost a load per product).
inline int block_rows(int64_t left, bool bf16) {
  return left == 1 ? 1 : left == 2 ? 2 : left <= 4 ? 4 : left <= 8 || !bf16 ? 8 : 16;
}

template <class T>
static void interleave_x(const Nf4TiledRowsArgs& a, std::vector<T>& xs) {
  const int64_t M = a.x.rows, K = a.w.cols, chunks = K / 8;
  const bool bf16 = a.x.dtype == DType::bfloat16;
  int64_t total = 0;
  for (int64_t m0 = 0; m0 < M; m0 += block_rows(M - m0, bf16)) total += block_rows(M - m0, bf16) * K;
  xs.assign(size_t(total), T(0));
  T* dst = xs.data();
  for (int64_t m0 = 0; m0 < M; m0 += block_rows(M - m0, bf16)) {
    const int mr = block_rows(M - m0, bf16);
    for (int m = 0; m < mr && m0 + m < M; ++m) {
      const T* src = a.x.data<T>() + (m0 + m) * a.x.ld;
      for (int64_t ch = 0; ch < chunks; ++ch) std::memcpy(dst + (ch * mr + m) * 8, src + 8 * ch, 8 * sizeof(T));
    }
    dst += mr * K;
  }
}

static void tiled_task(void* ctx, int64_t task) {
  const TiledCtx& c = *static_cast<TiledCtx*>(ctx);
  const Nf4TiledRowsArgs& a = *c.a;
  const int64_t M = a.x.rows, K = a.w.cols, t0 = task * c.tiles_per_task;
  const int64_t t1 = std::min(a.w.tiles(), t0 + c.tiles_per_task);
  std::vector<float> bt(size_t(a.v.ptr ? 16 * a.v.cols : 0));
  const bool bf16 = a.x.dtype == DType::bfloat16;
  for (int64_t t = t0; t < t1; ++t) {
    if (a.v.ptr) transpose_e(a, t, bt.data());
    int64_t offset = 0;
    for (int64_t m0 = 0; m0 < M;) {
      const int mr = block_rows(M - m0, bf16);
      if (bf16) {
        const bf16_t* xb = static_cast<const bf16_t*>(c.xs) + offset;
        switch (mr) {
          case 1: tile_bf16<1>(a, t, m0, xb, bt.data()); break;
          case 2: tile_bf16<2>(a, t, m0, xb, bt.data()); break;
          case 4: tile_bf16<4>(a, t, m0, xb, bt.data()); break;
          case 8: tile_bf16<8>(a, t, m0, xb, bt.data()); break;
          default: tile_bf16<16>(a, t, m0, xb, bt.data()); break;
        }
      } else {
        const float* xb = static_cast<const float*>(c.xs) + offset;
        switch (mr) {
          case 1: tile_fp32<1>(a, t, m0, xb, bt.data()); break;
          case 2: tile_fp32<2>(a, t, m0, xb, bt.data()); break;
          case 4: tile_fp32<4>(a, t, m0, xb, bt.data()); break;
          default: tile_fp32<8>(a, t, m0, xb, bt.data()); break;
        }
      }
      m0 += mr;
      offset += mr * K;
    }
  }
}

bool nf4_tiled_supported(DType x_dtype) {
  return x_dtype == DType::float32 || (x_dtype == DType::bfloat16 && cpu_has_bf16_dot());
}

void nf4_rows_tiled(const Nf4TiledRowsArgs& a, int num_threads) {
  LOWRANK_CHECK(nf4_tiled_supported(a.x.dtype), "x: bfloat16 over the tiled layout needs AVX512-BF16");
  // Few x rows stream the codes once (memory-bound): a task takes a run of tiles, about four per
  // thread, as nf4.cpp's rows_per_task; more rows are compute-bound and take one tile per task.
  const int64_t tiles = a.w.tiles(), threads = std::max(1, num_threads);
  const int64_t per = a.x.rows > 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(16, tiles / (4 * threads)));
  std::vector<float> xs32;
  std::vector<bf16_t> xs16;
  if (a.x.dtype == DType::bfloat16)
    interleave_x(a, xs16);
  else
    interleave_x(a, xs32);
  TiledCtx c{&a, per, a.x.dtype == DType::bfloat16 ? static_cast<const void*>(xs16.data()) : xs32.data()};
  parallel_for((tiles + per - 1) / per, num_threads, tiled_task, &c);
}
#else
bool nf4_tiled_supported(DType) { return false; }

void nf4_rows_tiled(const Nf4TiledRowsArgs&, int) {
  fail("the tiled NF4 layout needs the avx512 CPU kernel variant");
}
#endif

}  // namespace lowrank::cpu::LOWRANK_ISA
