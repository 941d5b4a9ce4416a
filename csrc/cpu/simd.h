// A minimal fp32 SIMD vocabulary, one definition per instruction set. Kernel sources are written
// once against it and compiled three times (CMake object libraries lowrank_cpu_{portable,avx2,avx512}),
// each inside its own namespace `lowrank::cpu::LOWRANK_ISA`, so the three copies never collide
// (no ODR merging of differently-compiled inline code).
//
// Vec::width lanes of fp32; loads from fp32 and bf16 (bf16 -> fp32 is exact: a 16-bit shift).
#pragma once
#include <cstdint>
#include <cstring>

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

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const bf16_t* p) { return bf16_to_float(*p); }
inline void store_scalar(float* p, float v) { *p = v; }
inline void store_scalar(bf16_t* p, float v) { *p = float_to_bf16(v); }

#if defined(__AVX512F__)
constexpr const char* kIsaName = "avx512";
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
inline void vstore(bf16_t* p, Vec a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(a.v)); }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vadd(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec vmul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline void vprefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16) is not part of this variant's baseline: the kernels that use
// it carry this target attribute and run only where the CPU reports it (nf4.cpp, lora.cpp). On a Zen 4
// one vdpbf16ps zmm per cycle does 32 multiply-adds against an fp32 FMA's 16 (117 vs 59 per ns on one
// core, measured in a register-only loop). (An earlier note here said they were equal, from a LoRA rows
// kernel that lost to widening; the kernel was at fault, not the instruction: lora.cpp's DotRowsJob,
// written with NR x MR register tiles over both operands as they are, runs M=16 in half the time.)
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
inline void vprefetch(const void* p) { __builtin_prefetch(p); }
#endif

// dst[0:n] = float(src[0:n]), vectorized with a scalar tail.
template <class T>
inline void widen(float* dst, const T* src, int64_t n) {
  int64_t k = 0;
  for (; k + Vec::width <= n; k += Vec::width) vstore(dst + k, vload(src + k));
  for (; k < n; ++k) dst[k] = load_scalar(src + k);
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

}  // namespace lowrank::cpu::LOWRANK_ISA
