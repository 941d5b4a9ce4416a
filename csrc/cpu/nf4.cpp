// NF4 on the CPU (compiled once per instruction set; see simd.h): quantization with double-quantized
// scales, dequantization, and the fused dequant-GEMV rows kernel for few tokens.
//
// Decoding is exact: the fp32 code book is looked up, never rounded to 16 bits. On AVX-512 the whole
// 16-entry table sits in one register and a lookup of 16 values is one vpermps (decode_group512). On
// AVX2 the lookup is four byte-plane table shuffles (vpshufb: byte j of every table entry in one
// register) plus two rounds of unpacking that reassemble the fp32 bits, 32 values per round; an
// 8-entry AVX2 vpermps lookup (two of them and a blend per 16 entries) measured 1.7x slower (Zen 2).
// Either way the values come out in a fixed scrambled "group order" inside each group of 64
// (group_source); the rows kernel permutes x the same way once per call instead of unscrambling W.
//
//   rows kernel:  out[m, n] = sum_k x[m, k] * W[n, k] + bias[n] + scale * v[m]·e[n]
//   M = 1:        each row's codes are decoded in registers and dotted with x on the spot; block
//                 scales are decoded ahead per chunk of groups and applied to the sums (sum_k t[q] x,
//                 then * absmax). AVX-512 reads 128 codes per load and takes their nibbles with
//                 shifts alone, so x is in "chunk order" there (chunk_source) but for a last group of 64.
//   M > 1:        NR rows x KC columns are decoded (scaled) into an L1 buffer, then an NR x MR
//                 register tile runs over every MR-row group of x.
//   other shapes: (in % 64 != 0, or no AVX2) each row is decoded into a buffer in natural order.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/parallel_for.h"
#include "cpu/simd.h"
#include "cpu/tile.h"
#include "nf4.h"

namespace lowrank::cpu::LOWRANK_ISA {

static const float kTable[16] = LOWRANK_NF4_TABLE;

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    u = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float load_any(std::uintptr_t base, DType t, int64_t i) {
  switch (t) {
    case DType::float32: return reinterpret_cast<const float*>(base)[i];
    case DType::bfloat16: return bf16_to_float(reinterpret_cast<const bf16_t*>(base)[i]);
    case DType::float16: return half_to_float(reinterpret_cast<const uint16_t*>(base)[i]);
    default: return 0.f;
  }
}

inline uint8_t nibble(const uint8_t* codes, int64_t flat) {
  const uint8_t b = codes[flat >> 1];
  return (flat & 1) ? uint8_t(b & 15) : uint8_t(b >> 4);
}

// =================================================================================================
// Quantization
// =================================================================================================
struct QuantCtx {
  const Nf4QuantizeArgs* a;
  int64_t blocks_per_task;
  float mid[15];
  std::atomic<bool> nonfinite{false};
};

// Code of one scaled value: how many midpoints lie strictly below it (bucketize, right=False).
inline uint8_t code_of(float s, const float* mid) {
  int c = 0;
  for (int i = 0; i < 15; ++i) c += mid[i] < s;
  return uint8_t(c);
}

#if defined(__AVX2__)
// Codes of 8 values already scaled: how many midpoints lie strictly below each (as int32 lanes).
inline __m256i codes8(__m256 s, const __m256* mids) {
  __m256i c = _mm256_setzero_si256();
  for (int j = 0; j < 15; ++j)  // the mask is -1 where mid < s: subtracting it counts it
    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(mids[j], s, _CMP_LT_OQ)));
  return c;
}

// 16 codes (two vectors of int32 lanes, element order) -> 8 packed bytes, the even element high.
inline void pack16(__m256i c0, __m256i c1, uint8_t* dst) {
  // int32 -> int16 (packs works per 128-bit lane, permute4x64 restores the order) -> uint8
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0xD8);
  const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));  // e0..e15
  // as 16-bit words: e_even in the low byte, e_odd in the high one -> (e_even << 4) | e_odd
  const __m128i pair = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x00ff)), 4), _mm_srli_epi16(b, 8));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(pair, pair));
}
#endif

// Codes of the n values of one block (scaled by 1/absmax, or divided for the partial last block),
// packed as nibbles starting at flat index f0 (even: blocks never start mid-byte).
static void quantize_block(const float* v, int64_t n, int64_t f0, bool partial, float am_eff, const float* mid,
                           uint8_t* codes) {
  const float inv = 1.0f / am_eff;
  uint8_t* dst = codes + f0 / 2;
  int64_t i = 0;
#if defined(__AVX2__)
  if (!partial) {
    const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-1.f), hi = _mm256_set1_ps(1.f);
    __m256 mids[15];
    for (int j = 0; j < 15; ++j) mids[j] = _mm256_set1_ps(mid[j]);
    for (; i + 16 <= n; i += 16) {
      const __m256 s0 = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), vinv), lo), hi);
      const __m256 s1 = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8), vinv), lo), hi);
      pack16(codes8(s0, mids), codes8(s1, mids), dst + i / 2);
    }
  }
#endif
  for (; i < n; i += 2) {
    float s0 = partial ? v[i] / am_eff : v[i] * inv;
    s0 = std::min(std::max(s0, -1.f), 1.f);
    // An odd-length tensor's last byte holds one value; bitsandbytes pads the scaled values with
    // a 0.0, so its low nibble is the code of 0 (7).
    float s1 = 0.f;
    if (i + 1 < n) {
      s1 = partial ? v[i + 1] / am_eff : v[i + 1] * inv;
      s1 = std::min(std::max(s1, -1.f), 1.f);
    }
    const uint8_t b = uint8_t((code_of(s0, mid) << 4) | code_of(s1, mid));
    dst[i / 2] = b;
  }
}

// max |v| over n values, and whether all are finite.
static float block_absmax(const float* v, int64_t n, bool* finite) {
  int64_t i = 0;
  float am = 0.f;
  bool ok = true;
#if defined(__AVX2__)
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 big = _mm256_set1_ps(3.402823466e38f);
  __m256 vm = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(v + i), absmask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // > FLT_MAX, or NaN
    vm = _mm256_max_ps(vm, a);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, vm);
  for (float x : t) am = std::max(am, x);
  ok = _mm256_movemask_ps(bad) == 0;
#endif
  for (; i < n; ++i) {
    const float x = std::fabs(v[i]);
    ok &= x <= 3.402823466e38f;  // false for inf and NaN
    am = std::max(am, x);
  }
  *finite = ok;
  return am;
}

static void quantize_task(void* p, int64_t task) {
  auto& c = *static_cast<QuantCtx*>(p);
  const Nf4QuantizeArgs& a = *c.a;
  const int64_t bs = a.blocksize, nb = (a.n + bs - 1) / bs;
  const int64_t b0 = task * c.blocks_per_task, b1 = min64(nb, b0 + c.blocks_per_task);
  auto* codes = reinterpret_cast<uint8_t*>(a.codes);
  auto* absmax = reinterpret_cast<float*>(a.absmax);
  float buf[4096];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t f0 = b * bs, len = min64(bs, a.n - f0);
    const float* v;
    if (a.dtype == DType::float32) {
      v = reinterpret_cast<const float*>(a.input) + f0;
    } else if (a.dtype == DType::bfloat16) {
      widen(buf, reinterpret_cast<const bf16_t*>(a.input) + f0, len);
      v = buf;
    } else {
      for (int64_t i = 0; i < len; ++i) buf[i] = half_to_float(reinterpret_cast<const uint16_t*>(a.input)[f0 + i]);
      v = buf;
    }
    bool finite = true;
    const float am = block_absmax(v, len, &finite);
    if (!finite) {
      c.nonfinite.store(true, std::memory_order_relaxed);
      return;
    }
    // bitsandbytes: scales clamp(absmax, 1e-38); a full block stores the raw absmax, the partial
    // last block the clamped one.
    const bool partial = len < bs;
    const float am_eff = std::max(am, 1e-38f);
    absmax[b] = partial ? am_eff : am;
    quantize_block(v, len, f0, partial, am_eff, c.mid, codes);
  }
}

void nf4_quantize(const Nf4QuantizeArgs& a, int num_threads) {
  QuantCtx c;
  c.a = &a;
  for (int i = 0; i < 15; ++i) c.mid[i] = (kTable[i] + kTable[i + 1]) / 2.0f;
  const int64_t nb = (a.n + a.blocksize - 1) / a.blocksize;
  c.blocks_per_task = std::max<int64_t>(1, (int64_t(1) << 16) / a.blocksize);  // ~64K values per task
  parallel_for((nb + c.blocks_per_task - 1) / c.blocks_per_task, num_threads, quantize_task, &c);
  LOWRANK_CHECK(!c.nonfinite.load(), "weight: contains NaN or infinity; NF4 cannot represent it");
}

// Nested (double) quantization of the absmax values, with bitsandbytes' CPU arithmetic (its 8-bit
// blockwise quantizer): a = absmax - offset; s = a * (1 / max|a|) over the block; s is mapped to one
// of 65536 evenly spaced bins, i = uint16((s + 1) * 0.5 * 65535 + 0.5), and the bin to the code2 entry
// nearest to its centre -1 + 2i/65535 (midpoints (c[j] + c[j+1]) / 2, a tie to the lower code).
// Binning makes the boundary between two codes land up to half a bin (1.5e-5) off their midpoint,
// so an exact nearest-code search would disagree with bitsandbytes' bytes for ~0.2% of the scales.
// A block whose values all equal the offset (max|a| = 0) gets code 0, as in bitsandbytes.
constexpr int kBins = 65536;

struct DqCtx {
  const Nf4DoubleQuantArgs* a;
  uint8_t bin_code[kBins];
};

static void build_bins(const float* code, uint8_t* bin_code) {
  float mid[255];
  for (int j = 0; j < 255; ++j) mid[j] = 0.5f * (code[j] + code[j + 1]);
  int c = 0;
  for (int i = 0; i < kBins; ++i) {
    const float centre = -1.0f + (2.0f * float(i)) / float(kBins - 1);
    while (c < 255 && mid[c] < centre) ++c;
    bin_code[i] = uint8_t(c);
  }
}

static void double_quant_task(void* p, int64_t blk) {
  const DqCtx& c = *static_cast<DqCtx*>(p);
  const Nf4DoubleQuantArgs& a = *c.a;
  const float* am = reinterpret_cast<const float*>(a.absmax);
  const float off = *reinterpret_cast<const float*>(a.offset);
  auto* q = reinterpret_cast<uint8_t*>(a.qabsmax);
  const int64_t i0 = blk * a.blocksize2, i1 = min64(a.n, i0 + a.blocksize2);
  float m = 0.f;
  for (int64_t i = i0; i < i1; ++i) m = std::max(m, std::fabs(am[i] - off));
  reinterpret_cast<float*>(a.absmax2)[blk] = m;
  if (m == 0.f) {
    for (int64_t i = i0; i < i1; ++i) q[i] = 0;
    return;
  }
  const float inv = 1.0f / m;
  for (int64_t i = i0; i < i1; ++i) {
    volatile float s = (am[i] - off) * inv;  // volatile: each step rounded to fp32, no FMA
    const float sc = std::min(std::max(float(s), -1.0f), 1.0f);
    volatile float t = (sc + 1.0f) * 0.5f;
    volatile float u = t * float(kBins - 1);
    const float bin = u + 0.5f;
    q[i] = c.bin_code[uint16_t(bin)];
  }
}

void nf4_double_quant(const Nf4DoubleQuantArgs& a, int num_threads) {
  auto c = std::make_unique<DqCtx>();
  c->a = &a;
  build_bins(reinterpret_cast<const float*>(a.code2), c->bin_code);
  parallel_for((a.n + a.blocksize2 - 1) / a.blocksize2, num_threads, double_quant_task, c.get());
}

// =================================================================================================
// Decoding helpers
// =================================================================================================
// Scalar: W[row, k0:k1] (flat index f = row * cols + k) into dst, scaled, natural order.
static void decode_span_scalar(const Nf4Weight& w, int64_t row, int64_t k0, int64_t k1, float* dst) {
  const uint8_t* codes = w.codes_ptr();
  int64_t f = row * w.cols + k0;
  const int64_t fend = row * w.cols + k1;
  while (f < fend) {
    const int64_t b = f / w.blocksize, bend = min64(fend, (b + 1) * w.blocksize);
    const float a = nf4_block_absmax(w, b);
    for (; f < bend; ++f) *dst++ = kTable[nibble(codes, f)] * a;
  }
}

#if defined(__AVX2__)
inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The table as four byte planes, each repeated in both 128-bit lanes (vpshufb works per lane).
struct Planes {
  __m256i p[4];
  Planes() {
    alignas(32) uint8_t b[4][32];
    for (int i = 0; i < 32; ++i) {
      uint32_t u;
      std::memcpy(&u, &kTable[i & 15], 4);
      for (int j = 0; j < 4; ++j) b[j][i] = uint8_t(u >> (8 * j));
    }
    for (int j = 0; j < 4; ++j) p[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b[j]));
  }
};

// 32 nibble indices (one per byte of idx) -> 4 vectors of fp32 table values. Output order: f[0]
// holds idx bytes 0-3 (lane 0) and 16-19 (lane 1), f[1] bytes 4-7 and 20-23, f[2] 8-11 and 24-27,
// f[3] 12-15 and 28-31.
inline void lookup32(const Planes& P, __m256i idx, __m256 f[4]) {
  const __m256i b0 = _mm256_shuffle_epi8(P.p[0], idx), b1 = _mm256_shuffle_epi8(P.p[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(P.p[2], idx), b3 = _mm256_shuffle_epi8(P.p[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

// One group of 64 elements (32 bytes) -> 8 vectors of table values in "group order": v[0..3] are the
// even elements (high nibbles), v[4..7] the odd ones, each in lookup32's byte order.
inline void decode_group(const Planes& P, const uint8_t* p, __m256 v[8]) {
  const __m256i by = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m4 = _mm256_set1_epi8(15);
  lookup32(P, _mm256_and_si256(_mm256_srli_epi16(by, 4), m4), v);
  lookup32(P, _mm256_and_si256(by, m4), v + 4);
}

#if defined(__AVX512F__)
// AVX-512: a 16-entry fp32 table lookup is one vpermps (its index is the low 4 bits of each dword), so
// 16 bytes of codes widened to dwords (vpmovzxbd) give their 16 high nibbles (after a shift) and their
// 16 low nibbles (as they are) in two permutes: 32 values for 4 instructions, against the AVX2 path's
// 12 byte shuffles and unpacks. "Group order" here: per half group of 32 values, the 16 even elements
// (high nibbles), then the 16 odd ones.
inline __m512 table512() { return _mm512_loadu_ps(kTable); }

// 32 values (16 bytes of codes) -> their 16 even (high nibbles) and 16 odd elements: unscaled table
// values, exact.
inline void decode_chunk512(__m512 table, const uint8_t* p, __m512& even, __m512& odd) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
  odd = _mm512_permutexvar_ps(d, table);
}

// One group of 64 (32 bytes) -> v[0] even and v[1] odd elements of its first 32 values, v[2], v[3]
// those of the last 32: unscaled table values, exact.
inline void decode_group512(__m512 table, const uint8_t* p, __m512 v[4]) {
  decode_chunk512(table, p, v[0], v[1]);
  decode_chunk512(table, p + 16, v[2], v[3]);
}

// bf16 decoding: the 16 values a block can take, table[q]·s rounded once to bf16, are a code book of
// 16 words; with the two scales of a group of 64 (s0: its first 32 values, s1: its last 32; equal
// unless blocksize is 32) the books fill the two halves of one register. Each output is then a word
// lookup (vpermw, 32 at a time) in natural order: the same bits as rounding each decoded value, at
// about half the instructions (no per-value multiply, rounding or unscrambling).
inline __m512i bf16_book512(__m512 table, float s0, float s1) {
  const __m256i lo = round_bf16(_mm512_mul_ps(table, _mm512_set1_ps(s0)));
  uint32_t b0, b1;  // as bits: -0 and +0 scale to zeros of different signs
  std::memcpy(&b0, &s0, 4);
  std::memcpy(&b1, &s1, 4);
  const __m256i hi = b1 == b0 ? lo : round_bf16(_mm512_mul_ps(table, _mm512_set1_ps(s1)));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// One group of 64 (32 bytes of codes) -> 64 bf16 values at out. Byte j holds element 2j in its high
// nibble and 2j+1 in its low one: widened to dword j, (b >> 4) | (b & 15) << 16 is the pair's two word
// indices in natural order; bit 4 picks the book's upper half for the group's last 32 values.
inline void bf16_group512(__m512i book, const uint8_t* p, bf16_t* out) {
  const __m512i low_nibble_up = _mm512_set1_epi32(0x000F0000);
  for (int c = 0; c < 2; ++c) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c)));
    __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16), low_nibble_up,
                                            0xF8);  // A | (B & C)
    if (c) idx = _mm512_or_si512(idx, _mm512_set1_epi16(0x10));
    _mm512_storeu_si512(out + 32 * c, _mm512_permutexvar_epi16(idx, book));
  }
}

// Position (within its group of 64) of the element that lands in slot s of the group order.
inline int group_source(int s) {
  const int half = s / 32, h = (s % 32) / 16, i = s % 16;  // h: 0 even elements, 1 odd
  return 32 * half + 2 * i + h;
}
#else
// Position (within its group of 64) of the element that lands in slot s of the group order.
inline int group_source(int s) {
  const int h = s / 32, j = s % 32;          // h: 0 even elements, 1 odd; j: slot in lookup32 order
  const int f = j / 8, i = j % 8;            // vector f, lane slot i
  const int byte = i < 4 ? f * 4 + i : 16 + f * 4 + (i - 4);
  return 2 * byte + h;
}
#endif

// group_source of every slot of a group of 64, computed once.
inline const std::array<int, 64>& group_order() {
  static const std::array<int, 64> order = [] {
    std::array<int, 64> o{};
    for (int s = 0; s < 64; ++s) o[size_t(s)] = group_source(s);
    return o;
  }();
  return order;
}

// Walks the block scales of one row group by group (64 values), with no division per group: an int64
// division per group cost as much as decoding the group. next2() gives the scales of the next group's
// first and last 32 values (two blocks at blocksize 32), next() the same as a vector matching
// lookup32's lanes. Rows may start inside a block. Needs cols % 64 == 0 and blocksize >= 32 (a power of
// two). The M=1 kernels take the scales ahead of their loops (group_scales): walked inside, among the
// four rows' vector work, the cursors doubled the loop's time.
class ScaleCursor {
 public:
  explicit ScaleCursor(const Nf4Weight& w) : w_(w) {
    while ((int64_t(1) << shift_) < w.blocksize) ++shift_;
    groups_per_block_ = w.blocksize >= 64 ? int(w.blocksize / 64) : 0;
  }

  void start(int64_t row, int64_t col = 0) {  // col: a multiple of 64
    const int64_t f0 = row * w_.cols + col;
    b_ = f0 >> shift_;
    if (w_.nested()) {
      b2_ = b_ / w_.blocksize2;
      r2_ = b_ - b2_ * w_.blocksize2;
    }
    // A row may start inside a block (blocks straddle rows when cols % blocksize != 0): only the
    // groups left in that block use its scale.
    left_ = 0;
    first_left_ = groups_per_block_ ? int((w_.blocksize - (f0 & (w_.blocksize - 1))) / 64) : 0;
  }

  __m256 next() {
    float s0, s1;
    next2(s0, s1);
    return _mm256_setr_m128(_mm_set1_ps(s0), _mm_set1_ps(s1));
  }

  // The same as two scalars: the scales of the group's first and last 32 values.
  void next2(float& s0, float& s1) {
    if (groups_per_block_ == 0) {  // blocksize 32: two blocks per group
      s0 = take();
      s1 = take();
      return;
    }
    if (left_ == 0) {
      cur_s_ = take();
      left_ = first_left_ ? first_left_ : groups_per_block_;
      first_left_ = 0;
    }
    --left_;
    s0 = s1 = cur_s_;
  }

 private:
  float take() {  // the current block's scale, then advance to the next block
    const float s = nf4_block_absmax(w_, b_, b2_);
    if (w_.nested() && ++r2_ == w_.blocksize2) r2_ = 0, ++b2_;
    ++b_;
    return s;
  }

  const Nf4Weight& w_;
  int shift_ = 0;
  int groups_per_block_ = 0;
  int64_t b_ = 0, b2_ = 0, r2_ = 0;
  int left_ = 0, first_left_ = 0;
  float cur_s_ = 0.f;
};

// The scales of groups [g0, g0 + count) of a row (s0: the group's first 32 values, s1: its last 32;
// equal unless blocksize is 32). Where rows are made of whole blocks (K % blocksize == 0, the usual
// case), block b's scale is computed once and spread over its groups in a tight loop; otherwise the
// cursor walks (it follows blocks straddling rows). Kept out of the decode loop, whose vector work
// then runs with no scalar chains between groups.
static void group_scales(const Nf4Weight& w, ScaleCursor& cur, int64_t row, int64_t g0, int64_t count,
                         float* s0, float* s1) {
  const int64_t K = w.cols, bs = w.blocksize;
  if (K % bs != 0) {
    for (int64_t g = 0; g < count; ++g) cur.next2(s0[g], s1[g]);
    return;
  }
  // Blocks in order from the chunk's first; the nested block index b2 kept as a counter (a division
  // per block costs as much as decoding its values).
  const int64_t per_block = bs >= 64 ? bs / 64 : 1;
  int64_t b = row * (K / bs) + (bs >= 64 ? g0 / per_block : 2 * g0);
  const int64_t bs2 = w.nested() ? w.blocksize2 : 1;
  int64_t b2 = b / bs2, r2 = b - b2 * bs2;
  auto take = [&]() {
    const float v = nf4_block_absmax(w, b, b2);
    ++b;
    if (++r2 == bs2) r2 = 0, ++b2;
    return v;
  };
  if (bs == 32) {
    for (int64_t g = 0; g < count; ++g) {
      s0[g] = take();
      s1[g] = take();
    }
    return;
  }
  if (per_block == 1) {
    int64_t g = 0;
#if defined(__AVX512F__)
    // Double-quantized, one block per group (blocksize 64, the usual case): 16 scales at a time, a
    // gather from code2, then the same fp32 multiply and add as nf4_block_absmax (no FMA: the same
    // bits). A run of 16 blocks inside one nested block shares its absmax2; where a run would cross
    // into the next, single scalar steps go first.
    if (w.nested()) {
      const uint8_t* q = reinterpret_cast<const uint8_t*>(w.qabsmax);
      const float* code2 = reinterpret_cast<const float*>(w.code2);
      const float* a2 = reinterpret_cast<const float*>(w.absmax2);
      const __m512 off = _mm512_set1_ps(*reinterpret_cast<const float*>(w.offset));
      while (g + 16 <= count) {
        if (r2 + 16 > bs2) {  // the run would cross into the next nested block: one scalar step
          s0[g] = s1[g] = take();
          ++g;
          continue;
        }
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b)));
        const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_i32gather_ps(idx, code2, 4), _mm512_set1_ps(a2[b2])), off);
        _mm512_storeu_ps(s0 + g, v);
        _mm512_storeu_ps(s1 + g, v);
        g += 16;
        b += 16;
        if ((r2 += 16) == bs2) r2 = 0, ++b2;
      }
    }
#endif
    for (; g < count; ++g) s0[g] = s1[g] = take();
    return;
  }
  for (int64_t g = 0; g < count;) {  // per_block is a power of two (so is the blocksize)
    const float v = take();
    for (int64_t stop = std::min(count, g + per_block - ((g0 + g) & (per_block - 1))); g < stop; ++g)
      s0[g] = s1[g] = v;
  }
}
#endif

// =================================================================================================
// Dequantization: out[i, :] = W[row0 + i, :]
// =================================================================================================
struct DequantCtx {
  const Nf4DequantizeArgs* a;
  int64_t rows_per_task;
};

// One vector of decoded values to the output row: fp32 as is, bf16 rounded in registers (the AVX2 decoder;
// AVX-512 writes bf16 rows by code-book lookups).
inline void put(float* f32, bf16_t* b16, int64_t at, Vec v) {
  if (f32)
    vstore(f32 + at, v);
  else
    vstore(b16 + at, v);
}

template <class TO>
static void store_row(TO* dst, const float* src, int64_t n) {
  int64_t k = 0;
  for (; k + Vec::width <= n; k += Vec::width) vstore(dst + k, vload(src + k));
  for (; k < n; ++k) store_scalar(dst + k, src[k]);
}

// Column tiles read a short run of every row (160 bytes of codes for 320 columns): too short for the
// hardware prefetchers to get ahead, so the runs kTileAhead rows on are requested in advance.
constexpr int64_t kTileAhead = 4;

static void dequant_task(void* p, int64_t task) {
  auto& c = *static_cast<DequantCtx*>(p);
  const Nf4DequantizeArgs& a = *c.a;
  const Nf4Weight& w = a.w;
  // Columns [k0, k0 + C) of each row (all of them unless a column tile was asked for).
  const int64_t K = w.cols, C = a.out.cols, k0 = a.col0;
  const int64_t i0 = task * c.rows_per_task, i1 = min64(a.out.rows, i0 + c.rows_per_task);
  std::vector<float> tmp;  // a bf16 row decoded by the scalar path, before its rounding
  const bool f32 = a.out.dtype == DType::float32;
#if defined(__AVX2__) && !defined(__AVX512F__)
  static const Planes P;
#endif
#if defined(__AVX2__)
  // The fast path decodes whole groups of 64 in natural order; it needs rows made of whole groups, and
  // a tile that starts and ends on group boundaries (or at the row's end).
  const bool fast = K % 64 == 0 && k0 % 64 == 0 && (C % 64 == 0 || k0 + C == K);  // (any valid blocksize)
#endif
#if defined(__AVX2__)
  ScaleCursor scales(w);
#endif
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = a.row0 + i;
    float* o32 = f32 ? a.out.data<float>() + i * a.out.ld : nullptr;
    bf16_t* o16 = f32 ? nullptr : a.out.data<bf16_t>() + i * a.out.ld;
#if defined(__AVX2__)
    if (fast) {  // writes the output row itself (a bf16 one rounded in registers)
      const uint8_t* codes = w.codes_ptr() + (row * K + k0) / 2;  // the output row starts at column k0
      if (C < K && i + kTileAhead < i1)  // a column tile: short runs K/2 bytes apart; ask for a later row's
        for (int64_t at = 0; at < C / 2; at += 64)
          _mm_prefetch(reinterpret_cast<const char*>(codes + kTileAhead * K / 2 + at), _MM_HINT_T0);
      scales.start(row, k0);
#if defined(__AVX512F__)
      const __m512 table = table512();
      if (!f32) {  // bf16: code-book lookups (bf16_group512), the book remade only when the scales change
        uint32_t key0 = 0, key1 = 0;
        __m512i book = _mm512_setzero_si512();
        for (int64_t g = 0; g < C; g += 64) {
          float s0, s1;
          scales.next2(s0, s1);
          uint32_t b0, b1;  // compared as bits: -0 and +0 scale to different zeros, NaN never equals
          std::memcpy(&b0, &s0, 4);
          std::memcpy(&b1, &s1, 4);
          if (g == 0 || b0 != key0 || b1 != key1) {
            book = bf16_book512(table, s0, s1);
            key0 = b0, key1 = b1;
          }
          bf16_group512(book, codes + g / 2, o16 + g);
        }
        continue;
      }
      // even/odd elements of 32 values -> natural order: interleave (lo: 0..15, hi: 16..31)
      const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      for (int64_t g = 0; g < C; g += 64) {
        __m512 v[4];
        decode_group512(table, codes + g / 2, v);
        float s0, s1;
        scales.next2(s0, s1);
        for (int c = 0; c < 2; ++c) {
          const __m512 sv = _mm512_set1_ps(c ? s1 : s0);
          const __m512 e = _mm512_mul_ps(v[2 * c], sv), o = _mm512_mul_ps(v[2 * c + 1], sv);
          _mm512_storeu_ps(o32 + g + 32 * c, _mm512_permutex2var_ps(e, lo, o));  // (bf16 took the books above)
          _mm512_storeu_ps(o32 + g + 32 * c + 16, _mm512_permutex2var_ps(e, hi, o));
        }
      }
#else
      for (int64_t g = 0; g < C; g += 64) {
        __m256 v[8];
        decode_group(P, codes + g / 2, v);
        const __m256 s = scales.next();
        // Unscramble: lookup32 vector f holds bytes {4f..4f+3} (lane 0) and {16+4f..} (lane 1);
        // even elements 2*byte come from v[0..3], odd ones from v[4..7].
        for (int f = 0; f < 4; ++f) {
          const __m256 e = _mm256_mul_ps(v[f], s), o = _mm256_mul_ps(v[4 + f], s);
          const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);  // pairs per lane
          // lane 0 of lo/hi: elements 8f .. 8f+7; lane 1: 32+8f .. 32+8f+7
          put(o32, o16, g + 8 * f, Vec{_mm256_permute2f128_ps(lo, hi, 0x20)});
          put(o32, o16, g + 32 + 8 * f, Vec{_mm256_permute2f128_ps(lo, hi, 0x31)});
        }
      }
#endif
      continue;
    }
#endif
    if (f32) {
      decode_span_scalar(w, row, k0, k0 + C, o32);
    } else {
      tmp.resize(size_t(C));
      decode_span_scalar(w, row, k0, k0 + C, tmp.data());
      store_row(o16, tmp.data(), C);
    }
  }
}

void nf4_dequantize(const Nf4DequantizeArgs& a, int num_threads) {
  DequantCtx c{&a, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, a.out.cols))};
  parallel_for((a.out.rows + c.rows_per_task - 1) / c.rows_per_task, num_threads, dequant_task, &c);
}

// =================================================================================================
// Fused rows: out = x · Wᵀ + bias + scale · v eᵀ
// =================================================================================================
constexpr int64_t KC = 512;            // columns decoded per buffer fill (NR x 2 KiB of L1)
constexpr int64_t ROWS_PER_TASK = 16;

// Rows of W per task. M = 1 streams W once (memory-bound): each thread should read long runs of
// consecutive rows, not 16-row slices alternating with the other thread's (dynamic scheduling hands
// out tasks in turn), which cut every run short for the prefetchers. About four tasks per thread,
// 16 to 256 rows each. Cold 4096 x 11008, 2 threads, Zen 4: 16 rows 1.68-1.78 ms fp32, 64 rows
// 1.37-1.49, 256 rows 1.33-1.49 (1024 rows lost on 576 -> 1536: two tasks for two threads).
// M > 1 is compute-bound and keeps ROWS_PER_TASK.
inline int64_t rows_per_task(int64_t M, int64_t N, int num_threads) {
  if (M > 1) return ROWS_PER_TASK;
  const int64_t per = N / (4 * int64_t(num_threads < 1 ? 1 : num_threads)) / 4 * 4;
  return per < 16 ? 16 : per > 256 ? 256 : per;
}

struct RowsCtx {
  const Nf4RowsArgs* a;
  const float* xs;   // x in the layout the decoder produces (group order, or natural)
  int64_t ldxs;
  bool grouped;      // xs in group order (fast AVX2 path)
  int64_t rows_per_task;
};

// out[m, n] = acc + adapter + bias, rounded once.
static void finish(const Nf4RowsArgs& a, int64_t m, int64_t n, float acc) {
  if (a.v.ptr) {
    const int64_t R = a.v.cols;
    const float* v = a.v.data<float>() + m * a.v.ld;
    float s = 0.f;
    if (a.e.dtype == DType::float32)
      s = dot(v, a.e.data<float>() + n * a.e.ld, R);
    else
      s = dot(v, a.e.data<bf16_t>() + n * a.e.ld, R);
    acc += a.scale * s;
  }
  if (a.bias.ptr) acc += load_any(a.bias.ptr, a.bias.dtype, n);
  if (a.out.dtype == DType::float32)
    a.out.data<float>()[m * a.out.ld + n] = acc;
  else
    a.out.data<bf16_t>()[m * a.out.ld + n] = float_to_bf16(acc);
}

// Generic path: each row decoded in natural order into a buffer, then dotted with every x row.
static void rows_task_generic(const RowsCtx& c, int64_t n0, int64_t n1) {
  const Nf4RowsArgs& a = *c.a;
  const int64_t K = a.w.cols, M = a.x.rows;
  std::vector<float> buf(size_t(std::max<int64_t>(K, 1)));
  for (int64_t n = n0; n < n1; ++n) {
    decode_span_scalar(a.w, n, 0, K, buf.data());
    for (int64_t m = 0; m < M; ++m) finish(a, m, n, dot(c.xs + m * c.ldxs, buf.data(), K));
  }
}

// The M = 1 kernels read a row's codes one 64-byte line per chunk of 128 values, but a row is only K/2
// bytes (2 KiB at K = 4096, 288 at 576): too short a stream for the hardware prefetcher to reach full
// speed on from a cold start. So each line of the row kPrefetchRows further on is requested as the
// current one is read. Weights read cold (twice the LLC in copies, used in turn; Zen 4, 2 threads,
// interleaved): 4096 x 4096 fp32 0.79 -> 0.67 ms, bf16 0.74 -> 0.64 ms; 4096 x 11008 fp32 2.31 ->
// 1.96 ms; 1536 x 576 fp32 0.046 -> 0.040 ms. (4 rows ahead gave about the same, 16 rows lost.)
constexpr int64_t kPrefetchRows = 8;

#if defined(__AVX512F__)
// M = 1 works on chunks of 128 values (64 bytes of codes, one zmm load per row) without widening
// shuffles: dword j of the load holds bytes 4j..4j+3, so shifting it right by 8k+4 (8k) puts the high
// (low) nibble of byte 4j+k in its low 4 bits, all vpermps reads. Eight shifts-and-permutes give the
// chunk's 128 values as 8 vectors; lane j of each holds one of elements 8j..8j+7, so the block scales
// enter per lane segment (Segs segments of 16/Segs lanes: 1 when a chunk lies in one block, 2 for
// blocksize 64, 4 for blocksize 32). x is permuted to match once per call (chunk_source). Against
// the widening path (vpmovzxbd per 16 values) this saves a third of the shuffles, the bottleneck.
// A row whose length is not a multiple of 128 ends with one group of 64 decoded as above.
inline int chunk_source(int s) {
  const int v = s / 16, j = s % 16, k = v / 2, h = v % 2;  // vector v = (byte k of each dword, nibble h)
  return 2 * (4 * j + k) + h;                               // h = 0: the high nibble (the even element)
}

template <int Segs>
inline __m512 scale_segments(__m512 t, const float* s0, const float* s1, int64_t g, __m512 acc) {
  // groups g and g + 1 of the row: lanes 0-7 group g, 8-15 group g + 1 (s0: first 32 values, s1: last)
  if (Segs == 1) return _mm512_fmadd_ps(t, _mm512_set1_ps(s0[g]), acc);
  if (Segs == 2) {
    acc = _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s0[g]), acc, 0x00FF);
    return _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s0[g + 1]), acc, 0xFF00);
  }
  acc = _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s0[g]), acc, 0x000F);
  acc = _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s1[g]), acc, 0x00F0);
  acc = _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s0[g + 1]), acc, 0x0F00);
  return _mm512_mask3_fmadd_ps(t, _mm512_set1_ps(s1[g + 1]), acc, 0xF000);
}

// Groups [g0, g0 + count) of four rows (count even; scales s0/s1 indexed from g0).
template <int Segs>
static void m1_chunks4(const uint8_t* const rc[4], const float* x, int64_t g0, int64_t count,
                       const float (*s0)[64], const float (*s1)[64], __m512 table, __m512 acc[4], int64_t ahead) {
  for (int64_t g = 0; g < count; g += 2) {
    const float* xc = x + 64 * (g0 + g);
    __m512 xv[8];
    for (int v = 0; v < 8; ++v) xv[v] = _mm512_loadu_ps(xc + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rc[r] + 32 * (g0 + g) + ahead), _MM_HINT_T0);
      const __m512i d = _mm512_loadu_si512(rc[r] + 32 * (g0 + g));
      __m512 ta = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table), xv[0]);
      __m512 tb = _mm512_mul_ps(_mm512_permutexvar_ps(d, table), xv[1]);
      ta = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 12), table), xv[2], ta);
      tb = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 8), table), xv[3], tb);
      ta = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 20), table), xv[4], ta);
      tb = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 16), table), xv[5], tb);
      ta = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 28), table), xv[6], ta);
      tb = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 24), table), xv[7], tb);
      acc[r] = scale_segments<Segs>(_mm512_add_ps(ta, tb), s0[r], s1[r], g, acc[r]);
    }
  }
}

// One group of 64 of four rows, in group order (a row's last 64 values when K % 128 == 64).
static void m1_group4(const uint8_t* const rc[4], const float* xg, int64_t g, const float (*s0)[64],
                      const float (*s1)[64], int64_t i, __m512 table, __m512 acc[4]) {  // i: g's scale slot
  for (int r = 0; r < 4; ++r) {
    __m512 v[4];
    decode_group512(table, rc[r] + 32 * g, v);
    const __m512 t0 = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(xg + 16), _mm512_mul_ps(v[0], _mm512_loadu_ps(xg)));
    const __m512 t1 = _mm512_fmadd_ps(v[3], _mm512_loadu_ps(xg + 48), _mm512_mul_ps(v[2], _mm512_loadu_ps(xg + 32)));
    acc[r] = _mm512_fmadd_ps(t1, _mm512_set1_ps(s1[r][i]), _mm512_fmadd_ps(t0, _mm512_set1_ps(s0[r][i]), acc[r]));
  }
}

static void rows_task_m1(const RowsCtx& c, int64_t n0, int64_t n1) {
  const Nf4RowsArgs& a = *c.a;
  const Nf4Weight& w = a.w;
  const int64_t K = w.cols, G = K / 64, G2 = G & ~int64_t(1);  // G2 groups in whole chunks
  const __m512 table = table512();
  const int segs = w.blocksize == 32 ? 4 : (w.blocksize >= 128 && K % w.blocksize == 0) ? 1 : 2;
  constexpr int64_t kChunk = 64;  // groups whose scales are decoded ahead (4096 values; even)
  alignas(64) float s0[4][kChunk], s1[4][kChunk];
  ScaleCursor sc[4] = {ScaleCursor(w), ScaleCursor(w), ScaleCursor(w), ScaleCursor(w)};
  for (int64_t n = n0; n < n1; n += 4) {
    const int rows = int(min64(4, n1 - n));
    const uint8_t* rc[4];
    int64_t row[4];
    __m512 acc[4];
    for (int r = 0; r < 4; ++r) {
      row[r] = n + (r < rows ? r : rows - 1);  // a short last tile repeats its last row
      rc[r] = w.codes_ptr() + row[r] * K / 2;
      sc[r].start(row[r]);
      acc[r] = _mm512_setzero_ps();
    }
    for (int64_t g0 = 0; g0 < G; g0 += kChunk) {
      const int64_t count = min64(kChunk, G - g0), whole = min64(count, G2 - g0);
      for (int r = 0; r < 4; ++r) group_scales(w, sc[r], row[r], g0, count, s0[r], s1[r]);
      if (segs == 1)
        m1_chunks4<1>(rc, c.xs, g0, whole, s0, s1, table, acc, kPrefetchRows * K / 2);
      else if (segs == 2)
        m1_chunks4<2>(rc, c.xs, g0, whole, s0, s1, table, acc, kPrefetchRows * K / 2);
      else
        m1_chunks4<4>(rc, c.xs, g0, whole, s0, s1, table, acc, kPrefetchRows * K / 2);
      if (whole < count)  // the odd last group
        m1_group4(rc, c.xs + 64 * (g0 + whole), g0 + whole, s0, s1, whole, table, acc);
    }
    for (int r = 0; r < rows; ++r) finish(a, 0, n + r, _mm512_reduce_add_ps(acc[r]));
  }
}

// ---- bf16 x where the CPU has AVX512-BF16: W rounded once to bf16, vdpbf16ps products ------------
// The DESIGN contract for a 16-bit compute dtype: W decoded in fp32 (table[q] * absmax) and rounded
// once to bf16, products accumulated in fp32, each output rounded once. Per chunk of 128 values the
// rounded code book of its blocks is one register: T = bf16(table * a0) in words 0-15, bf16(table * a1)
// in words 16-31 (the chunk's two groups of 64; a0 = a1 when one block covers it), built by two
// multiplies and one vcvtne2ps2bf16. One 64-byte load of codes holds in word j the nibbles of elements
// 4j+1, 4j, 4j+3, 4j+2 (bits 0, 4, 8, 12), so four shifts-and-lookups (vpermw reads the low 5 bits of
// each word; bit 4 picks the group's table) give the chunk's 128 bf16 weights, and each vdpbf16ps
// then does 32 multiply-adds. x is rearranged once per call to match ("dot order"). Against the fp32
// path (8 vpermps and 8 FMAs per 128 values per row) this halves the decode and multiply-add
// instructions per value (a Zen 4's vdpbf16ps does twice an FMA's multiply-adds per cycle: simd.h):
// 4096 x 4096 at M = 1 0.61 vs 0.74 ms, M = 16 2.4 vs 4.0 ms.
// (vdpbf16ps and vcvtne2ps2bf16 treat denormal inputs as zero: a weight or x below 1.2e-38 in
// magnitude counts as 0, an absolute difference the output's rounding cannot show.)
constexpr int kDotShift[4] = {0, 4, 8, 12};
constexpr int kDotElem[4] = {1, 0, 3, 2};  // element 4j + kDotElem[v] sits in word j of vector v

struct DotCtx {
  const Nf4RowsArgs* a;
  const bf16_t* xs;  // [chunks][mpad][128] bf16 in dot order, zero beyond K and M
  int64_t mpad;
  int64_t rows_per_task;
};

// Rows [n0, n1) of W against x rows [m0, m0 + MR), NR rows of W at a time. Two: the chunk's groups
// may have different scales (a table per half); else one table serves both halves.
template <int NR, int MR, bool Two>
LOWRANK_BF16_DOT static void dot_rows(const DotCtx& c, int64_t n0, int64_t n1, int64_t m0) {
  const Nf4RowsArgs& a = *c.a;
  const Nf4Weight& w = a.w;
  const int64_t K = w.cols, G = K / 64, M = a.x.rows;
  const int64_t ahead = kPrefetchRows * K / 2;
  const __m512 table = table512();
  const __m512i nibbles = _mm512_set1_epi16(0x0F0F);  // the nibbles at bits 0 and 8 of each word
  const __m512i upper = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(0x1010), 1);
  constexpr int64_t kChunk = 64;  // groups whose scales are decoded ahead (even)
  alignas(64) float s0[NR][kChunk], s1[NR][kChunk];
  static_assert(NR <= 4, "one ScaleCursor per tile row");
  ScaleCursor sc[4] = {ScaleCursor(w), ScaleCursor(w), ScaleCursor(w), ScaleCursor(w)};
  for (int64_t n = n0; n < n1; n += NR) {
    const int rows = int(min64(NR, n1 - n));
    const uint8_t* rc[NR];
    int64_t row[NR];
    __m512 acc[NR][MR];
    for (int r = 0; r < NR; ++r) {
      row[r] = n + (r < rows ? r : rows - 1);  // a short last tile repeats its last row
      rc[r] = w.codes_ptr() + row[r] * K / 2;
      sc[r].start(row[r]);
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    for (int64_t g0 = 0; g0 < G; g0 += kChunk) {
      const int64_t count = min64(kChunk, G - g0);
      for (int r = 0; r < NR; ++r) group_scales(w, sc[r], row[r], g0, count, s0[r], s1[r]);
      for (int64_t i = 0; i < count; i += 2) {
        const bool half = i + 1 == count;  // a row's last group of 64 when K % 128 == 64
        const bf16_t* xc = c.xs + (((g0 + i) / 2) * c.mpad + m0) * 128;
        __m512i wv[NR][4];
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
          const uint8_t* src = rc[r] + 32 * (g0 + i);
          _mm_prefetch(reinterpret_cast<const char*>(src + ahead), _MM_HINT_T0);  // kPrefetchRows on
          const __m512i d = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, src) : _mm512_loadu_si512(src);
          const __m512 lo = _mm512_mul_ps(table, _mm512_set1_ps(s0[r][i]));
          const __m512 hi = Two && !half ? _mm512_mul_ps(table, _mm512_set1_ps(s0[r][i + 1])) : lo;
          const __m512i t = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // words 0-15: lo, 16-31: hi
          __m512i idx[4];
          if (Two) {  // bit 4 of each index set in words 16-31 (the second table), cleared in 0-15
            const __m512i even = _mm512_ternarylogic_epi32(d, nibbles, upper, 0xEA);  // (d & 0x0F0F) | upper
            const __m512i odd = _mm512_ternarylogic_epi32(_mm512_srli_epi16(d, 4), nibbles, upper, 0xEA);
            idx[0] = even, idx[1] = odd, idx[2] = _mm512_srli_epi16(even, 8), idx[3] = _mm512_srli_epi16(odd, 8);
          } else {  // both halves of t are one table: bit 4 may be anything
            for (int v = 0; v < 4; ++v) idx[v] = kDotShift[v] ? _mm512_srli_epi16(d, kDotShift[v]) : d;
          }
          for (int v = 0; v < 4; ++v) wv[r][v] = _mm512_permutexvar_epi16(idx[v], t);
        }
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < 4; ++v) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xc + m * 128 + 32 * v);
            for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r][v], xv);
          }
      }
    }
    float total[NR * MR];
    vsums<NR * MR>(&acc[0][0], total);
    for (int r = 0; r < rows; ++r)
      for (int m = 0; m < MR && m0 + m < M; ++m) finish(a, m0 + m, n + r, total[r * MR + m]);
  }
}

template <int NR, int MR>
static void dot_task_for(const DotCtx& c, int64_t n0, int64_t n1, bool two) {
  for (int64_t m0 = 0; m0 < c.mpad; m0 += MR) {
    if (two)
      dot_rows<NR, MR, true>(c, n0, n1, m0);
    else
      dot_rows<NR, MR, false>(c, n0, n1, m0);
  }
}

// x rows per register tile: two W rows x MR x rows of fp32 sums (four W rows at M = 1); 16 x rows run
// as two passes of 8, which measured faster than one W row x 16 (x loads then serve one row only).
static int dot_mr(int64_t M) { return M == 1 ? 1 : M == 2 ? 2 : M <= 4 ? 4 : 8; }

static void dot_task(void* p, int64_t task) {
  const DotCtx& c = *static_cast<DotCtx*>(p);
  const Nf4Weight& w = c.a->w;
  const int64_t n0 = task * c.rows_per_task, n1 = min64(w.rows, n0 + c.rows_per_task);
  // One table per chunk unless a chunk can hold two blocks: blocksize 64, or blocks straddling rows.
  const bool two = !(w.blocksize >= 128 && w.cols % w.blocksize == 0);
  switch (dot_mr(c.a->x.rows)) {
    case 1: dot_task_for<4, 1>(c, n0, n1, two); break;
    case 2: dot_task_for<2, 2>(c, n0, n1, two); break;
    case 4: dot_task_for<2, 4>(c, n0, n1, two); break;
    default: dot_task_for<2, 8>(c, n0, n1, two); break;
  }
}

// Whether nf4_rows takes the bf16 products for this call (a bf16 x, AVX512-BF16, whole groups of 64,
// blocks of at least 64: a chunk then holds at most two scales).
static bool use_dot(const Nf4RowsArgs& a) {
  return a.x.dtype == DType::bfloat16 && a.w.cols % 64 == 0 && a.w.cols > 0 && a.w.blocksize >= 64 &&
         cpu_has_bf16_dot();
}

static void nf4_rows_dot(const Nf4RowsArgs& a, int num_threads) {
  const int64_t M = a.x.rows, K = a.w.cols, N = a.w.rows, MR = dot_mr(M);
  const int64_t mpad = (M + MR - 1) / MR * MR, chunks = (K + 127) / 128;
  std::vector<bf16_t> xs(size_t(chunks * mpad * 128), bf16_t(0));
  for (int64_t m = 0; m < M; ++m) {
    const bf16_t* src = a.x.data<bf16_t>() + m * a.x.ld;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      bf16_t* dst = xs.data() + (ch * mpad + m) * 128;
      const int64_t base = ch * 128, len = min64(128, K - base);
      for (int v = 0; v < 4; ++v)
        for (int j = 0; j < 32; ++j) {
          const int64_t e = 4 * j + kDotElem[v];
          if (e < len) dst[32 * v + j] = src[base + e];
        }
    }
  }
  DotCtx c{&a, xs.data(), mpad, rows_per_task(M, N, num_threads)};
  parallel_for((N + c.rows_per_task - 1) / c.rows_per_task, num_threads, dot_task, &c);
}
#elif defined(__AVX2__)
// M = 1: decode in registers, four rows at a time (independent chains for the shuffle ports), half a
// group (32 values, 4 vectors) at a time so the decoded values never leave the registers. Scales come
// per chunk of groups from group_scales (walking the cursor inside this loop doubled its time).
static void rows_task_m1(const RowsCtx& c, int64_t n0, int64_t n1) {
  const Planes P;  // a local copy: the planes stay in registers
  const Nf4RowsArgs& a = *c.a;
  const Nf4Weight& w = a.w;
  const int64_t K = w.cols, G = K / 64;
  const float* x = c.xs;
  const uint8_t* codes = w.codes_ptr();
  const __m256i m4 = _mm256_set1_epi8(15);
  constexpr int R = 4;
  constexpr int64_t kChunk = 64;
  const int64_t ahead = kPrefetchRows * K / 2;  // (see kPrefetchRows)
  alignas(32) float s0[R][kChunk], s1[R][kChunk];
  ScaleCursor sc[R] = {ScaleCursor(w), ScaleCursor(w), ScaleCursor(w), ScaleCursor(w)};
  for (int64_t n = n0; n < n1; n += R) {
    const int rows = int(min64(R, n1 - n));
    __m256 acc[R];
    const uint8_t* rc[R];
    int64_t row[R];
    for (int r = 0; r < R; ++r) {
      row[r] = n + (r < rows ? r : rows - 1);  // a short last tile repeats its last row
      acc[r] = _mm256_setzero_ps();
      rc[r] = codes + row[r] * K / 2;
      sc[r].start(row[r]);
    }
    for (int64_t g0 = 0; g0 < G; g0 += kChunk) {
      const int64_t count = min64(kChunk, G - g0);
      for (int r = 0; r < R; ++r) group_scales(w, sc[r], row[r], g0, count, s0[r], s1[r]);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t g = 64 * (g0 + i);
        __m256 sum[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          sum[r] = _mm256_setzero_ps();
          if (i % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(rc[r] + g / 2 + ahead), _MM_HINT_T0);
          const __m256i by = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rc[r] + g / 2));
          for (int h = 0; h < 2; ++h) {  // h = 0: even elements (high nibbles), 1: odd ones
            __m256 v[4];
            lookup32(P, h ? _mm256_and_si256(by, m4) : _mm256_and_si256(_mm256_srli_epi16(by, 4), m4), v);
            const float* xh = x + g + 32 * h;
            for (int j = 0; j < 4; ++j) sum[r] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xh + 8 * j), sum[r]);
          }
          // lane 0 of lookup32's vectors holds the group's first 32 values, lane 1 its last 32
          acc[r] = _mm256_fmadd_ps(sum[r], _mm256_setr_m128(_mm_set1_ps(s0[r][i]), _mm_set1_ps(s1[r][i])), acc[r]);
        }
      }
    }
    for (int r = 0; r < rows; ++r) finish(a, 0, n + r, hsum(acc[r]));
  }
}
#endif

#if defined(__AVX2__)
// M > 1: NR rows x KC columns decoded and scaled into an L1 buffer, then the NR x MR register tile
// of cpu/tile.h (the one the LoRA kernel uses) over every MR-row group of x.
static void rows_task_tiled(const RowsCtx& c, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  const __m512 table = table512();
#else
  static const Planes P;
#endif
  const Nf4RowsArgs& a = *c.a;
  const Nf4Weight& w = a.w;
  const int64_t K = w.cols, M = a.x.rows;
  alignas(64) float buf[NR * KC];
  std::vector<float> partial(size_t(NR * M));
  ScaleCursor sc[NR] = {ScaleCursor(w), ScaleCursor(w), ScaleCursor(w), ScaleCursor(w)};
  static_assert(NR == 4, "one ScaleCursor per tile row");
  for (int64_t nt = n0; nt < n1; nt += NR) {
    const int nr = int(min64(NR, n1 - nt));
    std::fill(partial.begin(), partial.end(), 0.f);
    for (int i = 0; i < nr; ++i) sc[i].start(nt + i);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t len = min64(KC, K - k0);
      for (int i = 0; i < NR; ++i) {
        float* dst = buf + i * KC;
        if (i >= nr) {  // a short last tile: zero rows keep the tile loop branch-free
          std::memset(dst, 0, sizeof(float) * size_t(len));
          continue;
        }
        const int64_t row = nt + i;
        const uint8_t* codes = w.codes_ptr() + row * K / 2;
        for (int64_t g = k0; g < k0 + len; g += 64) {
#if defined(__AVX512F__)
          __m512 v[4];
          decode_group512(table, codes + g / 2, v);
          float s0, s1;
          sc[i].next2(s0, s1);  // K chunks run in order, so the cursor follows
          for (int j = 0; j < 4; ++j)
            _mm512_store_ps(dst + (g - k0) + 16 * j, _mm512_mul_ps(v[j], _mm512_set1_ps(j < 2 ? s0 : s1)));
#else
          __m256 v[8];
          decode_group(P, codes + g / 2, v);
          const __m256 s = sc[i].next();  // K chunks run in order, so the cursor follows
          for (int j = 0; j < 8; ++j) _mm256_store_ps(dst + (g - k0) + 8 * j, _mm256_mul_ps(v[j], s));
#endif
        }
      }
      const float* rows[NR] = {buf, buf + KC, buf + 2 * KC, buf + 3 * KC};
      for (int64_t m = 0; m < M; m += MR) {
        const int mr = int(min64(MR, M - m));
        float sums[NR][MR] = {};
        tile_dispatch(mr, rows, c.xs + m * c.ldxs + k0, c.ldxs, 0, len, sums);
        for (int i = 0; i < nr; ++i)
          for (int j = 0; j < mr; ++j) partial[size_t(i * M + m + j)] += sums[i][j];
      }
    }
    for (int i = 0; i < nr; ++i)
      for (int64_t m = 0; m < M; ++m) finish(a, m, nt + i, partial[size_t(i * M + m)]);
  }
}
#endif

static void rows_task(void* p, int64_t task) {
  const RowsCtx& c = *static_cast<RowsCtx*>(p);
  const int64_t n0 = task * c.rows_per_task, n1 = min64(c.a->w.rows, n0 + c.rows_per_task);
#if defined(__AVX2__)
  if (c.grouped) {
    if (c.a->x.rows == 1)
      rows_task_m1(c, n0, n1);
    else
      rows_task_tiled(c, n0, n1);
    return;
  }
#endif
  rows_task_generic(c, n0, n1);
}

void nf4_rows(const Nf4RowsArgs& a, int num_threads) {
  const int64_t M = a.x.rows, K = a.w.cols, N = a.w.rows;
#if defined(__AVX512F__)
  if (a.bf16_dot && use_dot(a)) return nf4_rows_dot(a, num_threads);
#endif
  RowsCtx c{&a, nullptr, K, false, ROWS_PER_TASK};
#if defined(__AVX2__)
  c.grouped = K % 64 == 0 && K > 0;  // (any valid blocksize: a power of two in [32, 4096])
#endif
  // x (M x K, small) copied once, in fp32 (a bf16 x widened, exactly): into group order for the fast
  // path, contiguous otherwise.
  std::vector<float> xs(size_t(M * K)), widened;
  if (a.x.dtype == DType::bfloat16) widened.resize(size_t(K));
  for (int64_t m = 0; m < M; ++m) {
    const float* src = a.x.data<float>() + m * a.x.ld;
    if (!widened.empty()) {
      const bf16_t* x16 = a.x.data<bf16_t>() + m * a.x.ld;
      for (int64_t k = 0; k < K; ++k) widened[size_t(k)] = bf16_to_float(x16[k]);
      src = widened.data();
    }
    float* dst = xs.data() + m * K;
    if (c.grouped) {
#if defined(__AVX2__)
      const std::array<int, 64>& order = group_order();
      int64_t g = 0;
#if defined(__AVX512F__)
      if (M == 1) {  // rows_task_m1 reads whole chunks of 128 in chunk order, a last group of 64 in group order
        static const auto chunk_order = [] {
          std::array<int, 128> o{};
          for (int s = 0; s < 128; ++s) o[size_t(s)] = chunk_source(s);
          return o;
        }();
        for (; g + 128 <= K; g += 128)
          for (int s = 0; s < 128; ++s) dst[g + s] = src[g + chunk_order[size_t(s)]];
      }
#endif
      for (; g < K; g += 64)
        for (int s = 0; s < 64; ++s) dst[g + s] = src[g + order[size_t(s)]];
#endif
    } else {
      std::memcpy(dst, src, sizeof(float) * size_t(K));
    }
  }
  c.xs = xs.data();
  c.rows_per_task = rows_per_task(M, N, num_threads);
  parallel_for((N + c.rows_per_task - 1) / c.rows_per_task, num_threads, rows_task, &c);
}

// =================================================================================================
// Input gradient for few tokens: out = dy · W (fp32)
// =================================================================================================
// dy[m, n] as fp32, from an fp32 or bf16 dy.
inline float dy_value(const Matrix& dy, int64_t m, int64_t n) {
  return dy.dtype == DType::bfloat16 ? bf16_to_float(dy.data<bf16_t>()[m * dy.ld + n]) : dy.data<float>()[m * dy.ld + n];
}

struct InputGradCtx {
  const Nf4InputGradArgs* a;
  int64_t tasks;
};

#if defined(__AVX2__)
// The sums stay in registers. A tile of up to kIgMR rows of dy by one chunk of W's columns (kIgChunk:
// 32 with AVX-512, 16 with AVX2; kIgChunk / 2 bytes of codes per row of W: its even elements from the
// high nibbles, its odd ones from the low) holds 2·MR accumulators while the task's rows of W go by,
// kIgRows at a time: per row, one load, one shift, the table lookups and two multiplies give the chunk's
// exact fp32 weights, then 2·MR FMAs against dy's broadcast values. The block of kIgRows rows' codes
// (64 x K/2 bytes) stays in L1/L2 while its chunks are taken in turn; the rows' scales are decoded
// ahead, once per block. The workspace holds each chunk's even elements, then its odd ones
// (ig_order). (It replaced a loop that, per decoded group of 64, loaded, added into and stored each dy
// row's sums from the workspace: one load and one store per FMA; 4096 x 4096 on a Zen 4, 2 threads,
// M = 8: 9.9 ms against 5.2 for the tiled GEMM, so that kernel had taken only M <= 4.)
constexpr int64_t kIgRows = 64;
#if defined(__AVX512F__)
constexpr int kIgChunk = 32;
constexpr int kIgMR = 12;
using IgTable = __m512;
inline IgTable ig_table() { return table512(); }
#else
constexpr int kIgChunk = 16;
constexpr int kIgMR = 4;  // 8 sums, 2 table halves, the decoded chunk and its temporaries in 16 registers
struct IgTable {
  __m256 lo, hi;
};
inline IgTable ig_table() { return {_mm256_loadu_ps(kTable), _mm256_loadu_ps(kTable + 8)}; }
#endif
// bf16 products for a bf16 dy (AVX512-BF16 variant only), in tiles of at most kIgMRDot dy rows
#if defined(__AVX512BF16__)
constexpr bool kIgDot = true;
constexpr int kIgMRDot = 10;
#else
constexpr bool kIgDot = false;
constexpr int kIgMRDot = kIgMR;
#endif

// Workspace slot s of a group of 64 holds element ig_order()[s] of the group.
inline const std::array<int, 64>& ig_order() {
  static const std::array<int, 64> order = [] {
    std::array<int, 64> o{};
    for (int s = 0; s < 64; ++s) {
      const int c = s / kIgChunk, j = s % kIgChunk, h = j / (kIgChunk / 2), i = j % (kIgChunk / 2);
      o[size_t(s)] = kIgChunk * c + 2 * i + h;
    }
    return o;
  }();
  return order;
}
#endif

#if defined(__AVX512F__)
// Row r's chunk of W (16 bytes of codes): its 16 even and 16 odd elements, exact fp32.
__attribute__((always_inline)) inline void ig_decode(const uint8_t* codes, int64_t row_bytes, const float* scale,
                                                     int64_t sld, int64_t r, __m512 table, __m512& we, __m512& wo) {
  decode_chunk512(table, codes + r * row_bytes, we, wo);
  const __m512 s = _mm512_set1_ps(scale[r * sld]);
  we = _mm512_mul_ps(we, s);
  wo = _mm512_mul_ps(wo, s);
}

// A tile's sums: 2·MR registers loaded from `sums`, then step(e, o, r) for r = 0, Step, 2·Step, ... < rows,
// added up and stored. With few dy rows, one set's FMAs would wait on each other (each sum gains one per
// step), so U sets take alternate steps (U·2·MR independent chains) and are added at the end.
template <int MR, int Step, class F>
__attribute__((always_inline)) inline void ig_sums(float* sums, int64_t lds, int64_t rows, F&& step) {
  constexpr int U = MR >= 4 ? 1 : MR == 1 ? 4 : 2;
  __m512 e[U][MR], o[U][MR];
  for (int i = 0; i < MR; ++i) {
    e[0][i] = _mm512_loadu_ps(sums + i * lds);
    o[0][i] = _mm512_loadu_ps(sums + i * lds + 16);
    for (int u = 1; u < U; ++u) e[u][i] = o[u][i] = _mm512_setzero_ps();
  }
  int64_t r = 0;
  for (; r + Step * U <= rows; r += Step * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step(e[u], o[u], r + Step * u);
  }
  for (; r < rows; r += Step) step(e[0], o[0], r);
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < U; ++u) {
      e[0][i] = _mm512_add_ps(e[0][i], e[u][i]);
      o[0][i] = _mm512_add_ps(o[0][i], o[u][i]);
    }
    _mm512_storeu_ps(sums + i * lds, e[0][i]);
    _mm512_storeu_ps(sums + i * lds + 16, o[0][i]);
  }
}

template <int MR>
static void ig_tile(const uint8_t* codes, int64_t row_bytes, int64_t rows, const float* scale, int64_t sld,
                    const float* dyt, float* sums, int64_t lds, __m512 table) {
  ig_sums<MR, 1>(sums, lds, rows, [&](__m512 (&e)[MR], __m512 (&o)[MR], int64_t r) {
    __m512 we, wo;
    ig_decode(codes, row_bytes, scale, sld, r, table, we, wo);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(dyt[r * kIgMR + i]);
      e[i] = _mm512_fmadd_ps(b, we, e[i]);
      o[i] = _mm512_fmadd_ps(b, wo, o[i]);
    }
  });
}

#if defined(__AVX512BF16__)
// A bf16 dy with AVX512-BF16 (Nf4InputGradArgs::bf16_dot): W rounded once to bf16 (DESIGN's contract for
// a 16-bit compute dtype, as the GEMM path's bf16 tiles), two rows of W at a time. Each row's chunk is
// decoded as above, the pair rounded by one vcvtne2ps2bf16 and interleaved by one vpermw so that dword j
// holds (row r, row r + 1) at column j; one vdpbf16ps per dy row against its broadcast pair
// (dy[r], dy[r + 1]) then adds 32 exact products to 16 fp32 sums. 10 dy rows per tile (the pair's
// decode takes more registers).
alignas(64) static const uint16_t kPairWords[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

template <int MR>
static void ig_tile_dot(const uint8_t* codes, int64_t row_bytes, int64_t rows, const float* scale, int64_t sld,
                        const uint32_t* dyp, float* sums, int64_t lds, __m512 table) {
  const __m512i pairs = _mm512_load_si512(kPairWords);
  ig_sums<MR, 2>(sums, lds, rows, [&](__m512 (&e)[MR], __m512 (&o)[MR], int64_t r) {  // rows r, r + 1 (zero past the end)
    __m512 we0, wo0, we1 = _mm512_setzero_ps(), wo1 = _mm512_setzero_ps();
    ig_decode(codes, row_bytes, scale, sld, r, table, we0, wo0);
    if (r + 1 < rows) ig_decode(codes, row_bytes, scale, sld, r + 1, table, we1, wo1);
    const __m512bh E = (__m512bh)_mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(we1, we0));
    const __m512bh O = (__m512bh)_mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(wo1, wo0));
    const uint32_t* dp = dyp + (r / 2) * kIgMRDot;
#pragma GCC unroll 10
    for (int i = 0; i < MR; ++i) {
      // (vbroadcastss: a broadcast load alone; the compiler's vpbroadcastd for set1_epi32 may take a shuffle)
      const __m512bh b = (__m512bh)_mm512_broadcastss_ps(_mm_load_ss(reinterpret_cast<const float*>(dp + i)));
      e[i] = _mm512_dpbf16_ps(e[i], E, b);
      o[i] = _mm512_dpbf16_ps(o[i], O, b);
    }
  });
}
#endif  // __AVX512BF16__
#endif  // __AVX512F__

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2: a 16-entry lookup is two 8-entry vpermps and a blend on the index's bit 3 (moved to the sign).
inline __m256 ig_lookup8(const IgTable& t, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int MR>
static void ig_tile(const uint8_t* codes, int64_t row_bytes, int64_t rows, const float* scale, int64_t sld,
                    const float* dyt, float* sums, int64_t lds, const IgTable& table) {
  __m256 e[MR], o[MR];
  for (int i = 0; i < MR; ++i) {
    e[i] = _mm256_loadu_ps(sums + i * lds);
    o[i] = _mm256_loadu_ps(sums + i * lds + 8);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + r * row_bytes)));
    const __m256 s = _mm256_broadcast_ss(scale + r * sld);
    const __m256 we = _mm256_mul_ps(ig_lookup8(table, _mm256_srli_epi32(d, 4)), s);  // exact fp32 W
    const __m256 wo = _mm256_mul_ps(ig_lookup8(table, d), s);
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(dyt + r * kIgMR + i);
      e[i] = _mm256_fmadd_ps(b, we, e[i]);
      o[i] = _mm256_fmadd_ps(b, wo, o[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(sums + i * lds, e[i]);
    _mm256_storeu_ps(sums + i * lds + 8, o[i]);
  }
}
#endif

#if defined(__AVX2__)
// Task t accumulates rows [n0, n1) of W into its workspace slice (ig_order).
static void input_grad_task(void* p, int64_t t) {
  const IgTable table = ig_table();
  const auto& c = *static_cast<InputGradCtx*>(p);
  const Nf4InputGradArgs& a = *c.a;
  const Nf4Weight& w = a.w;
  const int64_t M = a.dy.rows, N = w.rows, K = w.cols, G = K / 64;
  const int64_t n0 = N * t / c.tasks, n1 = N * (t + 1) / c.tasks;
  float* acc = a.workspace.data<float>() + t * M * a.workspace.ld;
  const int64_t ld = a.workspace.ld;
  for (int64_t m = 0; m < M; ++m) std::memset(acc + m * ld, 0, sizeof(float) * size_t(K));
  // bf16 products (a bf16 dy, the measured choice, a variant with AVX512-BF16), else fp32 ones
  const bool dot = kIgDot && a.dy.dtype == DType::bfloat16 && a.bf16_dot;
  const int mr_max = dot ? kIgMRDot : kIgMR;
  // dy's rows in near-equal tiles of at most mr_max (each tile decodes W again)
  const int64_t tiles = (M + mr_max - 1) / mr_max;
  thread_local std::vector<float> scales, dyt;
  if (scales.size() < size_t(2 * kIgRows * G)) scales.resize(size_t(2 * kIgRows * G));
  // dy's values for the block's rows, tile by tile: [tile][row][i] as fp32 (one pointer and fixed offsets
  // for the broadcasts; read from dy's rows in place, their addresses had taken more registers than there
  // are), or for bf16 products [tile][row pair][i] as (dy[r], dy[r + 1]) bf16 pairs
  const int64_t tile_values = kIgRows * kIgMR;
  if (dyt.size() < size_t(tiles * tile_values)) dyt.resize(size_t(tiles * tile_values));
  float* s0 = scales.data();  // [row][group]: the scale of the group's first 32 values
  float* s1 = s0 + kIgRows * G;  // ... and of its last 32
  alignas(64) uint8_t packed[kIgRows * 64];
  ScaleCursor sc(w);
  const uint8_t* codes = w.codes_ptr();
  // the scale of chunk ch (of row 0; rows G apart): its group's, first or last 32 values
  auto chunk_scale = [&](int64_t ch) { return ((ch * kIgChunk) % 64 < 32 ? s0 : s1) + ch * kIgChunk / 64; };
  auto tile = [&](int64_t tm, const uint8_t* cc, int64_t row_bytes, int64_t rows, const float* scale, int64_t ch) {
    const int64_t m0 = M * tm / tiles, m1 = M * (tm + 1) / tiles;
    const float* d = dyt.data() + tm * tile_values;
    float* sums = acc + m0 * ld + kIgChunk * ch;
#if defined(__AVX512BF16__)
    if (dot) {
      with_count<kIgMRDot>(int(m1 - m0), [&](auto n) {
        ig_tile_dot<decltype(n)::value>(cc, row_bytes, rows, scale, G, reinterpret_cast<const uint32_t*>(d), sums,
                                        ld, table);
      });
      return;
    }
#endif
    with_count<kIgMR>(int(m1 - m0), [&](auto n) {
      ig_tile<decltype(n)::value>(cc, row_bytes, rows, scale, G, d, sums, ld, table);
    });
  };
  for (int64_t nb = n0; nb < n1; nb += kIgRows) {
    const int64_t rows = min64(kIgRows, n1 - nb);
    for (int64_t r = 0; r < rows; ++r) {
      sc.start(nb + r);
      group_scales(w, sc, nb + r, 0, G, s0 + r * G, s1 + r * G);
    }
    for (int64_t tm = 0; tm < tiles; ++tm) {
      const int64_t m0 = M * tm / tiles, m1 = M * (tm + 1) / tiles;
      float* d = dyt.data() + tm * tile_values;
      if (dot) {
        uint32_t* dp = reinterpret_cast<uint32_t*>(d);
        for (int64_t m = m0; m < m1; ++m) {
          const bf16_t* row = a.dy.data<bf16_t>() + m * a.dy.ld + nb;
          for (int64_t r = 0; r < rows; r += 2)
            dp[(r / 2) * kIgMRDot + (m - m0)] = uint32_t(row[r]) | (r + 1 < rows ? uint32_t(row[r + 1]) << 16 : 0u);
        }
      } else {
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t r = 0; r < rows; ++r)
            d[r * kIgMR + (m - m0)] = dy_value(a.dy, m, nb + r);
      }
    }
    for (int64_t line = 0; line < K / 128; ++line) {
      // The block's 64-byte lines of these 128 columns, packed: rows K/2 bytes apart share few L1 sets
      // (at K = 4096 all of them fall in two), so read in place they evicted each other between the
      // line's four chunks. The next line of each row is requested meanwhile.
      const uint8_t* src = codes + nb * (K / 2) + 64 * line;
      for (int64_t r = 0; r < rows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(src + r * (K / 2) + 64), _MM_HINT_T0);
        std::memcpy(packed + 64 * r, src + r * (K / 2), 64);
      }
      for (int64_t q = 0; q < 128 / kIgChunk; ++q) {
        const int64_t ch = (128 / kIgChunk) * line + q;
        for (int64_t tm = 0; tm < tiles; ++tm) tile(tm, packed + (kIgChunk / 2) * q, 64, rows, chunk_scale(ch), ch);
      }
    }
    if (K % 128) {  // the last 64 columns: their chunks read in place
      for (int64_t ch = (K - 64) / kIgChunk; ch < K / kIgChunk; ++ch)
        for (int64_t tm = 0; tm < tiles; ++tm)
          tile(tm, codes + nb * (K / 2) + (kIgChunk / 2) * ch, K / 2, rows, chunk_scale(ch), ch);
    }
  }
}

// Sum the task slices and unscramble their order (ig_order) into natural order, one (m, group) per step.
static void input_grad_reduce(void* p, int64_t m) {
  const auto& c = *static_cast<InputGradCtx*>(p);
  const Nf4InputGradArgs& a = *c.a;
  const int64_t M = a.dy.rows, K = a.w.cols, ld = a.workspace.ld;
  const std::array<int, 64>& order = ig_order();
  float* out = a.out.data<float>() + m * a.out.ld;
  const float* ws = a.workspace.data<float>();
  alignas(32) float sum[64];
  for (int64_t g = 0; g < K; g += 64) {
    for (int s = 0; s < 64; s += 8) {
      __m256 v = _mm256_loadu_ps(ws + m * ld + g + s);
      for (int64_t t = 1; t < c.tasks; ++t) v = _mm256_add_ps(v, _mm256_loadu_ps(ws + (t * M + m) * ld + g + s));
      _mm256_store_ps(sum + s, v);
    }
    for (int s = 0; s < 64; ++s) out[g + order[size_t(s)]] = sum[s];
  }
}
#endif

void nf4_input_grad(const Nf4InputGradArgs& a, int num_threads) {
#if defined(__AVX2__)
  InputGradCtx c{&a, a.workspace.rows / a.dy.rows};
  parallel_for(c.tasks, num_threads, input_grad_task, &c);
  parallel_for(a.dy.rows, num_threads, input_grad_reduce, &c);
#else
  // Portable build: decode row by row in natural order (slow, correct; the Python side prefers the
  // tiled GEMM path here).
  const int64_t M = a.dy.rows, N = a.w.rows, K = a.w.cols;
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t m = 0; m < M; ++m) std::memset(a.out.data<float>() + m * a.out.ld, 0, sizeof(float) * size_t(K));
  for (int64_t n = 0; n < N; ++n) {
    decode_span_scalar(a.w, n, 0, K, row.data());
    for (int64_t m = 0; m < M; ++m) {
      const float d = dy_value(a.dy, m, n);
      float* o = a.out.data<float>() + m * a.out.ld;
      for (int64_t k = 0; k < K; ++k) o[k] += d * row[size_t(k)];
    }
  }
  (void)num_threads;
#endif
}

}  // namespace lowrank::cpu::LOWRANK_ISA
