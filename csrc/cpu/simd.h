// A minimal fp32 SIMD vocabulary, one definition per instruction set. Kernel sources are written
// once against it and compiled three times (CMake object libraries lowrank_cpu_{portable,avx2,avx512}),
// each inside its own namespace `lowrank::cpu::LOWRANK_ISA`, so the three copies never collide
// (no ODR merging of differently-compiled inline code).
//
// Vec::width lanes of fp32; loads from fp32 and bf16 (bf16 -> fp32 is exact: a 16-bit shift).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if !defined(LOWRANK_ISA)
#error "LOWRANK_ISA must name the instruction set namespace (portable, avx2, avx512)"
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lowrank::cpu::LOWRANK_ISA {

using bf16_t = uint16_t;

inline float bf16_to_float(bf16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet).
inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t(u >> 16);
}

// exp(x) for fp32 (vexp below, one algorithm in every variant): n = round(x·log2 e), r = x − n·ln 2 in
// two parts (Cody-Waite: n·kLn2Hi is exact for |n| < 2^15), exp(r) by its Taylor polynomial of degree 7
// on |r| ≤ ln2/2 (truncation ≤ 5e-9 relative), times 2^n built in the exponent field. Results below
// FLT_MIN (x < kExpMin) are 0, exactly: -inf gives 0, NaN stays NaN. Valid for x ≤ 88 (the callers
// pass x − max ≤ 0); larger x is clamped.
constexpr float kExpMin = -87.0f, kExpMax = 88.0f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpC[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const bf16_t* p) { return bf16_to_float(*p); }
inline void store_scalar(float* p, float v) { *p = v; }
inline void store_scalar(bf16_t* p, float v) { *p = float_to_bf16(v); }

#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
constexpr const char* kIsaName = "avx512bf16";
#else
constexpr const char* kIsaName = "avx512";
#endif
struct Vec {
  static constexpr int width = 16;
  __m512 v;
};
inline Vec vzero() { return {_mm512_setzero_ps()}; }
inline Vec vset1(float f) { return {_mm512_set1_ps(f)}; }
inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
// 16 floats rounded as float_to_bf16 does (nearest even, NaN quieted), as 16 words.
inline __m256i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
#if defined(__AVX512BF16__)
// With AVX512-BF16 (the avx512bf16 variant): vcvtneps2bf16 rounds the same way (nearest even, NaN quieted
// the same) in one instruction, but flushes subnormal inputs to zero; a vector holding one goes the exact
// way. (Zen 5: the SiLU product's bf16 forward and backward ~30 % faster.)
inline void vstore(bf16_t* p, Vec a) {
  if (_mm512_fpclass_ps_mask(a.v, 0x20) == 0) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(a.v));
    return;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(a.v));
}
#else
inline void vstore(bf16_t* p, Vec a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(a.v)); }
#endif
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec vmul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline Vec vsub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec vdiv(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
// max(a, b) lane by lane; b where either is NaN (the instruction's rule, in every variant).
inline Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float vhmax(Vec a) { return _mm512_reduce_max_ps(a.v); }
inline Vec vexp(Vec x) {
  const __m512 lo = _mm512_set1_ps(kExpMin);
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(kExpMax), _mm512_max_ps(lo, x.v));  // NaN passes through
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC[7]);
  for (int i = 6; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return {_mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x.v, lo, _CMP_LT_OQ), _mm512_setzero_ps())};
}
inline void vprefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16) is not part of the avx512 variant's baseline (the avx512bf16
// variant, compiled with it, is that variant plus its one-instruction bf16 stores): the kernels that use
// vdpbf16ps carry this target attribute and run it only where the CPU reports it (nf4.cpp, nf4_tiled.cpp,
// lora.cpp, lora_input_grad.cpp, adapter_products.cpp), in both AVX-512 variants. A vdpbf16ps
// zmm does 32 multiply-adds against an fp32 FMA's 16, at the same issue rate: the VM lscpu calls a Zen 4
// (family 25 model 17) issued two of either per cycle, 273 vs 136 G multiply-adds/s on one core, in an
// inline-asm loop of 16 independent register accumulators; torch's bf16 GEMM reaches 258 per core there
// (94 %), the kernels below 30-45 %. Earlier notes here said 117 vs 59 (that loop kept its accumulators
// on the stack: it measured store-to-load forwarding), and before that that the two were equal, from a
// LoRA rows kernel that lost to widening: the kernel was at fault, not the instruction (lora.cpp's
// DotRowsJob, written with NR x MR register tiles over both operands as they are, runs M=16 in half
// the time).
#define LOWRANK_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512bf16")))
inline bool cpu_has_bf16_dot() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return ok;
}

#elif defined(__AVX2__)
constexpr const char* kIsaName = "avx2";
struct Vec {
  static constexpr int width = 8;
  __m256 v;
};
inline Vec vzero() { return {_mm256_setzero_ps()}; }
inline Vec vset1(float f) { return {_mm256_set1_ps(f)}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
// Rounded as float_to_bf16 does (nearest even, NaN quieted), 8 lanes at a time.
inline void vstore(bf16_t* p, Vec a) {
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),  // |u| as a
                                         _mm256_set1_epi32(0x7f800000));                      // signed int
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);                               // 16-bit values in 32-bit lanes
  const __m256i packed = _mm256_packus_epi32(r, r);            // per 128-bit lane: r0-3 r0-3 | r4-7 r4-7
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec vmul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vsub(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec vdiv(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline float vhmax(Vec a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline Vec vexp(Vec x) {
  const __m256 lo = _mm256_set1_ps(kExpMin);
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(kExpMax), _mm256_max_ps(lo, x.v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC[7]);
  for (int i = 6; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.v, lo, _CMP_LT_OQ), y)};
}
inline void vprefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

#else
// Portable C++: plain arrays the compiler may vectorize for whatever the baseline target offers.
constexpr const char* kIsaName = "portable";
struct Vec {
  static constexpr int width = 8;
  float v[8];
};
inline Vec vzero() { return Vec{}; }
inline Vec vset1(float f) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = f;
  return r;
}
inline Vec vload(const float* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = p[i];
  return r;
}
inline Vec vload(const bf16_t* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = bf16_to_float(p[i]);
  return r;
}
inline void vstore(float* p, Vec a) {
  for (int i = 0; i < 8; ++i) p[i] = a.v[i];
}
inline void vstore(bf16_t* p, Vec a) {
  for (int i = 0; i < 8; ++i) p[i] = float_to_bf16(a.v[i]);
}
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline Vec vadd(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
inline Vec vmul(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
  return a;
}
inline float vsum(Vec a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
inline Vec vsub(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i];
  return a;
}
inline Vec vdiv(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.v[i] /= b.v[i];
  return a;
}
inline Vec vmax(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
  return a;
}
inline float vhmax(Vec a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}
// Branch-free, so the compiler can vectorize it for the baseline target: the clamp by comparisons (a
// NaN becomes the lower bound, so none reaches the float-to-int conversion; it is put back at the end),
// rounding to nearest by adding and subtracting 1.5·2^23 (|x·log2 e| < 2^22 here).
inline Vec vexp(Vec x) {
  Vec y;
  for (int i = 0; i < 8; ++i) {
    const float xi = x.v[i];
    float xc = xi > kExpMin ? xi : kExpMin;
    xc = xc < kExpMax ? xc : kExpMax;
    const float n = (xc * kLog2e + 12582912.0f) - 12582912.0f;
    const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
    const float p = kExpC[0] + r * (kExpC[1] + r * (kExpC[2] + r * (kExpC[3] + r * (kExpC[4] + r * (kExpC[5] +
                    r * (kExpC[6] + r * kExpC[7]))))));  // (written out: a loop here keeps GCC from vectorizing)
    const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, 4);
    const float e = xi < kExpMin ? 0.0f : p * two_n;
    y.v[i] = xi != xi ? xi : e;
  }
  return y;
}
inline void vprefetch(const void* p) { __builtin_prefetch(p); }
#endif

// out[i] = the sum of v[i]'s lanes, i < Count: the reductions that end a register tile. One vector's
// sum is a chain of shuffles and adds (~8 instructions on AVX-512), so a tile of 16 accumulators spent
// ~130 instructions reducing, against ~290 vdpbf16ps or FMAs over a 576-wide row: a quarter of a small
// layer's time. Reduced together, Vec::width vectors at a time (pairs unpacked and added, then quads,
// then the 128-bit lanes), they take 45 instructions per 16 (AVX-512) or 21 per 8 (AVX2); a last,
// partial group is padded with zeros. The sums' order is fixed (a tree over each vector's lanes), so
// results do not depend on which accumulators share a group.
#if defined(__AVX512F__) || defined(__AVX2__)
namespace detail {
#if defined(__AVX512F__)
using Raw = __m512;
inline Raw unpack_add(Raw a, Raw b) { return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); }
inline Raw quad_add(Raw a, Raw b) { return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE)); }
// w[0..3]: per 128-bit lane j, the lane-j partial sums of four vectors each -> the 16 full sums.
inline Raw lanes_add(const Raw w[4]) {
  const Raw y0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
  const Raw y1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xDD));
}
inline void store(float* p, Raw a) { _mm512_storeu_ps(p, a); }
#else
using Raw = __m256;
inline Raw unpack_add(Raw a, Raw b) { return _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b)); }
inline Raw quad_add(Raw a, Raw b) { return _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xEE)); }
inline Raw lanes_add(const Raw w[2]) {
  return _mm256_add_ps(_mm256_permute2f128_ps(w[0], w[1], 0x20), _mm256_permute2f128_ps(w[0], w[1], 0x31));
}
inline void store(float* p, Raw a) { _mm256_storeu_ps(p, a); }
#endif
}  // namespace detail

inline detail::Raw raw(Vec a) { return a.v; }
inline detail::Raw raw(detail::Raw a) { return a; }

// V: Vec or the instruction set's raw register type (__m512 / __m256).
template <int Count, class V>
inline void vsums(const V* v, float* out) {
  constexpr int W = Vec::width;
  if constexpr (Count < W / 2) {  // too few to share the shuffles
    for (int i = 0; i < Count; ++i) out[i] = vsum(Vec{raw(v[i])});
  } else {
    const detail::Raw z = vzero().v;
    for (int g = 0; g < Count; g += W) {
      detail::Raw u[W / 2], w[W / 4];
      for (int i = 0; i < W / 2; ++i) {
        const int a = g + 2 * i, b = a + 1;
        u[i] = detail::unpack_add(a < Count ? raw(v[a]) : z, b < Count ? raw(v[b]) : z);
      }
      for (int i = 0; i < W / 4; ++i) w[i] = detail::quad_add(u[2 * i], u[2 * i + 1]);
      if (Count - g >= W) {
        detail::store(out + g, detail::lanes_add(w));
      } else {
        alignas(64) float all[W];
        detail::store(all, detail::lanes_add(w));
        for (int i = 0; i < Count - g; ++i) out[g + i] = all[i];
      }
    }
  }
}
#else
template <int Count, class V>
inline void vsums(const V* v, float* out) {
  for (int i = 0; i < Count; ++i) out[i] = vsum(v[i]);
}
#endif

// dst[0:n] = float(src[0:n]), vectorized with a scalar tail.
template <class T>
inline void widen(float* dst, const T* src, int64_t n) {
  int64_t k = 0;
  for (; k + Vec::width <= n; k += Vec::width) vstore(dst + k, vload(src + k));
  for (; k < n; ++k) dst[k] = load_scalar(src + k);
}

// f(std::integral_constant<int, n>{}) for a run-time n in [1, N]: register tiles are templates on their
// row count, and a call picks the one for the rows it has (nothing happens for n outside [1, N]).
template <int N, class F, int... Is>
inline void with_count_impl(int n, F& f, std::integer_sequence<int, Is...>) {
  ((n == Is + 1 ? f(std::integral_constant<int, Is + 1>{}) : void()), ...);
}
template <int N, class F>
inline void with_count(int n, F&& f) {
  with_count_impl<N>(n, f, std::make_integer_sequence<int, N>{});
}

// The row kernels' many-token passes (lora.cpp, lora_input_grad.cpp) read a block [k0, k1) of K of a
// group of w's rows once per token row or group, from L1/L2 after the first pass, which requests the
// block read next meanwhile: the offset, in elements, from the current block to it — the group's next
// block, else the next group's first (group_stride elements on, where `next_group` says there is one),
// 0 when there is none. Without it the first pass of every block waited on memory: a few rows are too
// short a stream for the hardware prefetcher to run ahead.
inline int64_t next_block_offset(int64_t k0, int64_t k1, int64_t K, int64_t group_stride, bool next_group) {
  if (k1 < K) return k1 - k0;
  return next_group ? group_stride - k0 : 0;
}

// widen, also requesting src[j + ahead] as it reads src[j], a 64-byte line at a time (ahead 0: nothing):
// the row kernels widen a block of w while the block after it comes in (next_block_offset).
template <class T>
inline void widen_ahead(float* dst, const T* src, int64_t n, int64_t ahead) {
  constexpr int64_t line = 64 / int64_t(sizeof(T));
  for (int64_t j = 0; j < n; j += line) {
    if (ahead) vprefetch(src + j + ahead);
    widen(dst + j, src + j, n - j < line ? n - j : line);
  }
}

// The n < Vec::width elements at p as one vector, the lanes past them `pad`; and the first n lanes of v
// stored at p (a row's last partial vector: no access past its end).
template <class T>
inline Vec vload_n(const T* p, int64_t n, float pad) {
  alignas(64) float buf[Vec::width];
  for (int i = 0; i < Vec::width; ++i) buf[i] = i < n ? load_scalar(p + i) : pad;
  return vload(buf);
}
template <class T>
inline void vstore_n(T* p, Vec v, int64_t n) {
  alignas(64) float buf[Vec::width];
  vstore(buf, v);
  for (int64_t i = 0; i < n; ++i) store_scalar(p + i, buf[i]);
}

// dot(a[0:n], b[0:n]) in fp32, vectorized with a scalar tail.
template <class TB>
inline float dot(const float* a, const TB* b, int64_t n) {
  constexpr int W = Vec::width;
  Vec acc0 = vzero(), acc1 = vzero();
  int64_t k = 0;
  for (; k + 2 * W <= n; k += 2 * W) {
    acc0 = vfma(vload(a + k), vload(b + k), acc0);
    acc1 = vfma(vload(a + k + W), vload(b + k + W), acc1);
  }
  for (; k + W <= n; k += W) acc0 = vfma(vload(a + k), vload(b + k), acc0);
  float s = vsum(vadd(acc0, acc1));
  for (; k < n; ++k) s += a[k] * load_scalar(b + k);
  return s;
}

// exp(x) of one float by vexp's algorithm (the same value a vector lane would get).
inline float exp1(float x) {
  float buf[Vec::width];
  vstore(buf, vexp(vset1(x)));
  return buf[0];
}

}  // namespace lowrank::cpu::LOWRANK_ISA
