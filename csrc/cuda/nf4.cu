// NF4 (4-bit NormalFloat, bitsandbytes' byte layout) on CUDA: quantize a weight, double-quantize its
// scales, dequantize row tiles, and the fused few-token product with the LoRA term. csrc/nf4.h is the
// contract; this file only implements it.
//
// Layout. W [rows, cols] is flattened row-major, f = r * cols + k.
//   codes[f / 2]  two 4-bit codes per byte: even f in the HIGH nibble, odd f in the low nibble.
//   block b       the `blocksize` consecutive f with f / blocksize == b (blocksize a power of two in
//                 [32, 4096]); blocks may straddle rows, the last one may be partial.
//   absmax[b]     fp32, or double-quantized: code2[q[b]] * absmax2[b / blocksize2] + offset, a rounded
//                 fp32 multiply then a rounded add (block_absmax below = nf4_block_absmax in nf4.h).
//   W[r, k]       = table[code(f)] * absmax[f / blocksize]: ONE rounded fp32 multiply (__fmul_rn, never
//                 fused into a later add), then rounded once to the output dtype.
//
// Two facts the fast paths rely on:
//   * blocks start at multiples of blocksize >= 32, so a run of 8 (or 32) codes starting at a flat
//     index that is a multiple of 8 (32) lies inside ONE block: its absmax is decoded once per run;
//   * if cols % 8 == 0 (% 32 == 0) every row starts 4-byte (16-byte) aligned relative to `codes`.
//
// Kernels (all launched on the caller's stream, all memory allocated by torch):
//   nf4_quantize_kernel        one warp per quantization block: absmax, then codes two at a time.
//   nf4_double_quant_kernel    one 256-thread block per group of blocksize2 scales.
//   nf4_dequantize_*_kernel    grid-stride; 4 code bytes -> 8 outputs per thread when cols % 8 == 0,
//                              one element per thread otherwise.
//   nf4_rows_kernel            out = x · W^T + bias + scale · v e^T for few token rows: one warp per
//                              output feature n, 16-byte code loads, decoded weights kept in fp32
//                              registers and reused by all token rows of the tile, fp32 accumulation,
//                              one shuffle reduction per token row (adapter term folded in), one
//                              rounding to out's dtype.
//
// Tuning constants below have NOT been measured on a GPU yet (none was available when this was
// written); each says what it was chosen from and should be revisited with benchmarks/.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/convert.cuh"
#include "cuda/cuda_common.h"
#include "nf4.h"

namespace lowrank::cuda {
namespace {

// The NF4 code book (index = code). Kernels copy it to shared memory: lanes index it with different
// codes, which __constant__ memory would serialize, while 16 floats in 16 banks never conflict.
__constant__ float c_nf4_table[16] = LOWRANK_NF4_TABLE;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCode2Size = 256;  // entries of the double-quantization code book (code2)

// Grid-stride loops cap their grids here: far more blocks than any GPU runs at once (132 SMs x 16
// resident blocks on H100/H200), and keeps every grid well inside gridDim.x's 2^31 - 1.
constexpr int64_t kMaxGridBlocks = int64_t(1) << 20;

int64_t grid_blocks(int64_t work_items, int64_t items_per_block) {
  return std::max<int64_t>(1, std::min(kMaxGridBlocks, (work_items + items_per_block - 1) / items_per_block));
}

// log2 of a power of two (validated by the callers' validate_* functions).
int log2_pow2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

bool aligned(std::uintptr_t p, std::uintptr_t bytes) { return p % bytes == 0; }

// A strided matrix whose every row starts 16-byte aligned (what 16-byte vector accesses need).
bool rows_aligned16(const Matrix& m) {
  return aligned(m.ptr, 16) && (m.rows <= 1 || (m.ld * dtype_size(m.dtype)) % 16 == 0);
}

// ---- dtype conversions -----------------------------------------------------------------------------

// Element i of a float32 / bfloat16 / float16 array whose dtype is only known at run time (bias and e:
// read once per output or once per rank column, so a switch costs nothing measurable).
__device__ __forceinline__ float load_f32(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::bfloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::float16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f32(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::bfloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case DType::float16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// The 16 / sizeof(T) values of T packed in a 16-byte word, widened to fp32 with bit operations
// (exact; no type punning of the local word). Little-endian: the lower address is the low half.
template <class T> struct Unpack16;
template <> struct Unpack16<float> {
  static constexpr int n = 4;
  __device__ __forceinline__ static void run(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
  }
};
template <> struct Unpack16<__nv_bfloat16> {
  static constexpr int n = 8;
  __device__ __forceinline__ static void pair(uint32_t u, float* f) {
    f[0] = __uint_as_float(u << 16);          // bf16 -> fp32 is a 16-bit left shift
    f[1] = __uint_as_float(u & 0xffff0000u);
  }
  __device__ __forceinline__ static void run(const uint4& r, float* f) {
    pair(r.x, f); pair(r.y, f + 2); pair(r.z, f + 4); pair(r.w, f + 6);
  }
};
template <> struct Unpack16<__half> {
  static constexpr int n = 8;
  __device__ __forceinline__ static void pair(uint32_t u, float* f) {
    f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
    f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
  }
  __device__ __forceinline__ static void run(const uint4& r, float* f) {
    pair(r.x, f); pair(r.y, f + 2); pair(r.z, f + 4); pair(r.w, f + 6);
  }
};

// Stores 8 consecutive outputs (already fp32, each rounded once here) with 16-byte stores; `o` must be
// 16-byte aligned.
__device__ __forceinline__ void store8_vec(float* o, const float (&v)[8]) {
  reinterpret_cast<float4*>(o)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(o)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16, float a, float b) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}
__device__ __forceinline__ uint32_t pack2(__half, float a, float b) {
  return uint32_t(__half_as_ushort(__float2half_rn(a))) | (uint32_t(__half_as_ushort(__float2half_rn(b))) << 16);
}
template <class T>
__device__ __forceinline__ void store8_vec(T* o, const float (&v)[8]) {
  const T tag{};
  *reinterpret_cast<uint4*>(o) =
      make_uint4(pack2(tag, v[0], v[1]), pack2(tag, v[2], v[3]), pack2(tag, v[4], v[5]), pack2(tag, v[6], v[7]));
}

// ---- numerics shared by the kernels (host-callable too, so they can be unit-tested without a GPU) --

__host__ __device__ __forceinline__ float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;  // a lone subtraction: nothing to contract
#endif
}

// NF4 code of a scaled value s in [-1, 1]: the number of the 15 table midpoints strictly below s
// (torch.bucketize(s, midpoints, right=False)): the nearest table entry, a tie to the lower code.
__host__ __device__ __forceinline__ unsigned nf4_code(float s, const float (&mid)[15]) {
  unsigned c = 0;
  for (int i = 0; i < 15; ++i) c += mid[i] < s ? 1u : 0u;  // constant trip count: nvcc unrolls it
  return c;
}

// Code j (0..7) of a 32-bit little-endian word holding the codes of flat f0 .. f0 + 7 (f0 even):
// byte j / 2, high nibble for even j.
__host__ __device__ __forceinline__ unsigned word_code(uint32_t word, int j) {
  return (word >> (8 * (j >> 1) + ((j & 1) ? 0 : 4))) & 15u;
}

// Code of flat element f, given its byte codes[f / 2].
__host__ __device__ __forceinline__ unsigned byte_code(unsigned byte, int64_t f) {
  return (f & 1) ? (byte & 15u) : ((byte >> 4) & 15u);
}

__device__ __forceinline__ void load_table(float* s_table) {
  if (threadIdx.x < 16) s_table[threadIdx.x] = c_nf4_table[threadIdx.x];
  __syncthreads();
}

// Scale of block b: exactly nf4_block_absmax() of nf4.h (plain fp32, or code2[q] * absmax2 + offset
// with no fused multiply-add), reading through the read-only data cache.
__device__ __forceinline__ float block_absmax(const Nf4Weight& w, int64_t b) {
  if (w.qabsmax == 0) return __ldg(reinterpret_cast<const float*>(w.absmax) + b);
  const uint8_t q = __ldg(reinterpret_cast<const uint8_t*>(w.qabsmax) + b);
  const float c = __ldg(reinterpret_cast<const float*>(w.code2) + q);
  const float s = __ldg(reinterpret_cast<const float*>(w.absmax2) + b / w.blocksize2);
  const float off = __ldg(reinterpret_cast<const float*>(w.offset));
  return __fadd_rn(__fmul_rn(c, s), off);
}

__device__ __forceinline__ const uint8_t* codes_of(const Nf4Weight& w) {
  return reinterpret_cast<const uint8_t*>(w.codes);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// ==== 1. quantization ===============================================================================
//
//   absmax[b] = max |v| over block b (exact in fp32)
//   s         = v * (1 / absmax)  (full block)   or   v / absmax  (the partial last block)
//   code      = nf4_code(clamp(s, -1, 1)),  codes[f / 2] = code(f) << 4 | code(f + 1)
//
// (absmax here is max(absmax, 1e-38) for the scaling; see the kernel.) One warp per block: pass 1
// reduces absmax with shuffles, pass 2 re-reads the block (from L1/L2) and writes one byte per lane per
// step, lanes on consecutive bytes. Non-finite inputs set *status = 1 and count as 0, so whatever is
// written stays finite (the caller raises anyway).
constexpr int kQuantWarps = 8;  // 256 threads: a common occupancy-friendly size; not measured

template <class T>
__global__ void __launch_bounds__(kQuantWarps * 32)
nf4_quantize_kernel(const T* __restrict__ in,       // [n] contiguous, float32 / bfloat16 / float16
                    int64_t n,                      // number of values
                    int log2bs,                     // log2(blocksize)
                    uint8_t* __restrict__ codes,    // [ceil(n / 2)] two codes per byte, first high
                    float* __restrict__ absmax,     // [ceil(n / blocksize)]
                    int* __restrict__ status) {     // [1] set to 1 on a non-finite input
  const int lane = threadIdx.x & 31;
  const int64_t bs = int64_t(1) << log2bs;
  const int64_t nblocks = (n + bs - 1) >> log2bs;

  // Midpoints between neighbouring table entries, computed in fp32 exactly as the contract says.
  float mid[15];
#pragma unroll
  for (int i = 0; i < 15; ++i) mid[i] = __fmul_rn(__fadd_rn(c_nf4_table[i], c_nf4_table[i + 1]), 0.5f);

  const int64_t warp0 = int64_t(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  const int64_t nwarps = int64_t(gridDim.x) * kQuantWarps;
  for (int64_t b = warp0; b < nblocks; b += nwarps) {  // uniform per warp
    const int64_t start = b << log2bs;
    const int64_t end = min(start + bs, n);

    float am = 0.f;
    bool bad = false;
    for (int64_t f = start + lane; f < end; f += 32) {
      const float v = to_f32(in[f]);
      if (isfinite(v)) am = fmaxf(am, fabsf(v));
      else bad = true;
    }
    am = warp_max(am);
    if (__any_sync(kFullMask, bad) && lane == 0) atomicExch(status, 1);

    // The reference's guard (lowrank/ops/nf4.py, bitsandbytes): scale by max(absmax, 1e-38); a full
    // block stores the raw absmax, the partial last block the guarded one. 1 / 1e-38 ~ 1e38 is finite,
    // so s is never NaN: an all-zero block gives s = +-0, code 7 (0.0). 1e-38 is subnormal: this relies
    // on the build keeping denormals (no -ftz / --use_fast_math, as CMakeLists.txt compiles).
    const bool full = end - start == bs;
    const float am_eff = fmaxf(am, 1e-38f);
    if (lane == 0) absmax[b] = full ? am : am_eff;
    const float inv = __fdiv_rn(1.0f, am_eff);
    auto code_of = [&](float v) -> unsigned {
      if (!isfinite(v)) return nf4_code(0.f, mid);  // flagged above; keep the output finite
      const float s = full ? __fmul_rn(v, inv) : __fdiv_rn(v, am_eff);
      return nf4_code(fminf(fmaxf(s, -1.f), 1.f), mid);
    };

    const int64_t npairs = (end - start + 1) >> 1;  // block starts are even (blocksize >= 32)
    for (int64_t p = lane; p < npairs; p += 32) {
      const int64_t f = start + 2 * p;
      const unsigned hi = code_of(to_f32(in[f]));
      // odd n: bitsandbytes pads the scaled values with 0.0, so the last low nibble is its code (7)
      const unsigned lo = f + 1 < end ? code_of(to_f32(in[f + 1])) : nf4_code(0.f, mid);
      codes[(start >> 1) + p] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

// ==== 2. double quantization of the scales ===========================================================
//
//   d[i]       = absmax[i] - offset                                  (fp32)
//   absmax2[g] = max |d| over group g of blocksize2 scales
//   s          = clamp(d * (1 / absmax2), -1, 1)
//   bin        = uint16((s + 1) * 0.5 * 65535 + 0.5)                 (every step rounded to fp32)
//   q[i]       = number of code2 midpoints strictly below -1 + 2 bin / 65535
//
// bitsandbytes' CPU quantizer bins values this way (nf4.h); the CPU kernel and the reference do the
// same, so a checkpoint's bytes do not depend on the device it was quantized on. absmax2 = 0: code 0.
// One 256-thread block per group (grid-stride over groups); the midpoints live in shared memory.
constexpr int kDqThreads = 256;  // = kCode2Size: one code2 entry loaded per thread
constexpr int kBins = 65536;

__global__ void __launch_bounds__(kDqThreads)
nf4_double_quant_kernel(const float* __restrict__ absmax,   // [n] block scales
                        int64_t n,                          // number of scales
                        const float* __restrict__ offset,   // [1] mean(absmax)
                        const float* __restrict__ code2,    // [256] sorted ascending
                        int64_t bs2,                        // blocksize2
                        uint8_t* __restrict__ qabsmax,      // [n] 8-bit codes into code2
                        float* __restrict__ absmax2) {      // [ceil(n / bs2)]
  __shared__ float s_code2[kCode2Size];
  __shared__ float s_mid[kCode2Size - 1];
  __shared__ float s_max[kDqThreads / 32];
  static_assert(kDqThreads == kCode2Size, "one code2 entry per thread");
  s_code2[threadIdx.x] = code2[threadIdx.x];
  __syncthreads();
  if (threadIdx.x < kCode2Size - 1)
    s_mid[threadIdx.x] = __fmul_rn(0.5f, __fadd_rn(s_code2[threadIdx.x], s_code2[threadIdx.x + 1]));
  __syncthreads();
  const float off = *offset;
  const int64_t ngroups = (n + bs2 - 1) / bs2;
  for (int64_t g = blockIdx.x; g < ngroups; g += gridDim.x) {  // uniform per block
    const int64_t start = g * bs2;
    const int64_t end = min(start + bs2, n);
    float m = 0.f;
    for (int64_t i = start + threadIdx.x; i < end; i += kDqThreads) m = fmaxf(m, fabsf(sub_rn(absmax[i], off)));
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = m;
    __syncthreads();
    float am2 = 0.f;
#pragma unroll
    for (int w = 0; w < kDqThreads / 32; ++w) am2 = fmaxf(am2, s_max[w]);
    if (threadIdx.x == 0) absmax2[g] = am2;
    const float inv = am2 == 0.f ? 0.f : __fdiv_rn(1.0f, am2);
    for (int64_t i = start + threadIdx.x; i < end; i += kDqThreads) {
      unsigned code = 0;
      if (am2 != 0.f) {
        const float s = fminf(fmaxf(__fmul_rn(sub_rn(absmax[i], off), inv), -1.f), 1.f);
        const float u = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(s, 1.f), 0.5f), float(kBins - 1)), 0.5f);
        const unsigned bin = static_cast<unsigned>(u);  // u in [0.5, 65535.5]: truncation, as uint16()
        const float centre = __fadd_rn(-1.f, __fdiv_rn(2.f * float(bin), float(kBins - 1)));
        unsigned lo = 0, hi = kCode2Size - 1;  // count of midpoints < centre, in [0, 255]
        while (lo < hi) {
          const unsigned mid = (lo + hi) >> 1;
          if (s_mid[mid] < centre) lo = mid + 1; else hi = mid;
        }
        code = lo;
      }
      qabsmax[i] = static_cast<uint8_t>(code);
    }
    __syncthreads();  // s_max is rewritten by the next group
  }
}

// ==== 3. dequantization ==============================================================================
//
//   out[i, k] = table[code(f)] * absmax(f / blocksize),  f = (row0 + i) * cols + k
//
// Vector path (cols % 8 == 0, codes 4-byte aligned): the tile's codes are contiguous, so thread g of the
// grid-stride loop reads 4 bytes = the 8 codes of flat row0 * cols + 8 g .. + 7 (one block, one absmax
// decode), and writes them with 16-byte stores when out's rows are 16-byte aligned. Scalar path
// otherwise (odd cols: rows start mid-byte; blocks straddle rows): one element per thread.
constexpr int kDequantThreads = 256;  // common occupancy-friendly size; not measured

template <class TO>
__global__ void __launch_bounds__(kDequantThreads)
nf4_dequantize_vec_kernel(Nf4Weight w,               // codes [rows*cols/2], scales as in nf4.h
                          int log2bs,                // log2(w.blocksize)
                          int64_t row0,              // first weight row of the tile
                          int64_t rows,              // rows in the tile
                          TO* __restrict__ out,      // [rows, w.cols], leading dimension ldo
                          int64_t ldo,
                          bool store16) {            // out rows 16-byte aligned: vector stores
  __shared__ float s_table[16];
  load_table(s_table);
  const int64_t per_row = w.cols >> 3;               // groups of 8 codes per row
  const int64_t groups = rows * per_row;
  const int64_t flat0 = row0 * w.cols;               // multiple of 8
  const uint32_t* words = reinterpret_cast<const uint32_t*>(codes_of(w) + (flat0 >> 1));
  for (int64_t g = int64_t(blockIdx.x) * kDequantThreads + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * kDequantThreads) {
    const int64_t i = g / per_row;
    const int64_t k = (g - i * per_row) << 3;
    const uint32_t word = __ldg(words + g);
    const float am = block_absmax(w, (flat0 + (g << 3)) >> log2bs);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(s_table[word_code(word, j)], am);
    TO* o = out + i * ldo + k;
    if (store16) {
      store8_vec(o, v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = from_f32<TO>(v[j]);
    }
  }
}

template <class TO>
__global__ void __launch_bounds__(kDequantThreads)
nf4_dequantize_scalar_kernel(Nf4Weight w,            // codes [ceil(rows*cols/2)], scales as in nf4.h
                             int log2bs,             // log2(w.blocksize)
                             int64_t row0,           // first weight row of the tile
                             int64_t rows,           // rows in the tile
                             TO* __restrict__ out,   // [rows, w.cols], leading dimension ldo
                             int64_t ldo) {
  __shared__ float s_table[16];
  load_table(s_table);
  const int64_t cols = w.cols;
  const int64_t total = rows * cols;
  const uint8_t* codes = codes_of(w);
  for (int64_t idx = int64_t(blockIdx.x) * kDequantThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kDequantThreads) {
    const int64_t i = idx / cols;
    const int64_t k = idx - i * cols;
    const int64_t f = (row0 + i) * cols + k;
    const unsigned code = byte_code(__ldg(codes + (f >> 1)), f);
    out[i * ldo + k] = from_f32<TO>(__fmul_rn(s_table[code], block_absmax(w, f >> log2bs)));
  }
}

// ==== 4. fused rows: out = x · dequant(W)^T + bias + scale · v e^T ====================================
//
//   out[m, n] = sum_k x[m, k] * (table[code(n, k)] * absmax)  +  scale * sum_j e[n, j] * v[m, j]  +  bias[n]
//
// One warp per output feature n (grid-stride over n), all token rows m of a tile of MT at once.
// Fast path (K % 32 == 0; codes and x rows 16-byte aligned, hence every row's codes too): lane L reads
// the 16 bytes = 32 codes of k = 32 L .. 32 L + 31 (+ 1024 per step), all inside one quantization
// block, decodes them with one absmax into 32 fp32 registers, and every token row of the tile reuses
// them, reading its x slice with 16-byte loads. The next step's codes and absmax are loaded before the
// current step's arithmetic, to keep two code loads in flight per lane.
// Expected ceiling (not yet measured): one shared-memory table lookup per weight, i.e. 32 weights = 16
// code bytes per SM clock, ~4.2 TB/s of codes on an H200 against its 4.8 TB/s of HBM: the decode, not
// DRAM, may bind at M = 1. A lookup from registers (prmt byte planes) costs more instructions than that.
// General path (any K, rows starting mid-byte): lanes stride over k one code at a time, absmax cached
// per block. Then the adapter term (lanes split R), a shuffle reduction per row, bias, one rounding.
struct RowsParams {
  void* out;           // [M, N] float32 or x's dtype, leading dimension ldo
  int64_t ldo;
  DType out_dtype;
  const void* x;       // [M, K] float32 / bfloat16 / float16 (T), leading dimension ldx
  int64_t ldx;
  Nf4Weight w;         // [N, K] NF4 codes + scales
  int log2bs;          // log2(w.blocksize)
  const void* bias;    // [N] float32 / bfloat16 / float16, or null
  DType bias_dtype;
  const float* v;      // [M, R] float32 (u = A x), leading dimension ldv, or null
  int64_t ldv;
  const void* e;       // [N, R] float32 / bfloat16 / float16 (rows of B), leading dimension lde
  int64_t lde;
  DType e_dtype;
  float scale;
  int64_t M;           // token rows
  int64_t R;           // adapter rank (0 when v is null)
  int64_t N;           // output features (weight rows)
  int64_t K;           // input features (weight cols)
};

// 4 warps per block: N / 4 blocks, so even N = 1024 fills 132 SMs twice over; occupancy is bounded by
// registers, not by blocks per SM. Chosen by that arithmetic, not measured.
constexpr int kRowsWarps = 4;

// acc + sum_i x_row[i] * wv[i] over the 32 decoded weights of one lane; x_row 16-byte aligned.
template <class T>
__device__ __forceinline__ float dot32(const T* __restrict__ x_row, const float (&wv)[32], float acc) {
  using U = Unpack16<T>;
  const uint4* p = reinterpret_cast<const uint4*>(x_row);
#pragma unroll
  for (int c = 0; c < 32 / U::n; ++c) {
    float f[U::n];
    U::run(__ldg(p + c), f);
#pragma unroll
    for (int i = 0; i < U::n; ++i) acc = fmaf(f[i], wv[c * U::n + i], acc);
  }
  return acc;
}

// Resident 128-thread blocks per SM requested from ptxas, i.e. a register cap of 65536 / (128 * blocks):
// 64 registers at MT = 1, 96 at MT = 2, 80 at MT = 4 and 8, 128 at MT = 16. Uncapped, ptxas hoists every
// token row's x loads and takes 128-255 registers (spilling at MT = 16, and at MT = 8 for fp32 x). The
// values are the tightest caps at which ptxas (CUDA 13.0, sm_80/86/89/90) reports no spill; the few-
// token case (MT = 1) then keeps 32 warps per SM, about the 16-byte loads in flight H100/H200 need to
// stream at full bandwidth (~25 KB per SM). Not timed yet.
template <int MT>
constexpr int rows_min_blocks() { return MT == 1 ? 8 : MT == 2 ? 5 : MT <= 8 ? 6 : 4; }

template <class T, int MT, bool kFast>
__global__ void __launch_bounds__(kRowsWarps * 32, rows_min_blocks<MT>())
nf4_rows_kernel(const RowsParams p) {
  __shared__ float s_table[16];
  load_table(s_table);
  const int lane = threadIdx.x & 31;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  const uint8_t* __restrict__ codes = codes_of(p.w);

  for (int64_t n = int64_t(blockIdx.x) * kRowsWarps + (threadIdx.x >> 5); n < p.N;
       n += int64_t(gridDim.x) * kRowsWarps) {  // uniform per warp: shuffles below see all 32 lanes
    const int64_t row_flat = n * K;
    for (int64_t m0 = 0; m0 < p.M; m0 += MT) {  // M > MT re-streams the row's codes (L2-resident)
      const int mt = static_cast<int>(min(int64_t(MT), p.M - m0));
      const T* __restrict__ xt = x + m0 * p.ldx;
      float acc[MT];
#pragma unroll
      for (int j = 0; j < MT; ++j) acc[j] = 0.f;

      if constexpr (kFast) {
        // Row n's codes: K / 2 bytes starting at byte n * K / 2, a multiple of 16.
        const uint4* row_codes = reinterpret_cast<const uint4*>(codes + (row_flat >> 1));
        constexpr int64_t kStep = 32 * 32;  // k covered by the warp per step
        int64_t k0 = int64_t(lane) * 32;
        uint4 q_next = make_uint4(0u, 0u, 0u, 0u);
        float am_next = 0.f;
        if (k0 < K) {
          q_next = __ldg(row_codes + (k0 >> 5));
          am_next = block_absmax(p.w, (row_flat + k0) >> p.log2bs);
        }
        for (; k0 < K; k0 += kStep) {
          const uint4 q = q_next;
          const float am = am_next;
          if (k0 + kStep < K) {  // prefetch the next step
            q_next = __ldg(row_codes + ((k0 + kStep) >> 5));
            am_next = block_absmax(p.w, (row_flat + k0 + kStep) >> p.log2bs);
          }
          float wv[32];
          const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int j = 0; j < 8; ++j) wv[8 * c + j] = __fmul_rn(s_table[word_code(words[c], j)], am);
          }
#pragma unroll
          for (int j = 0; j < MT; ++j)
            if (j < mt) acc[j] = dot32(xt + int64_t(j) * p.ldx + k0, wv, acc[j]);
        }
      } else {
        int64_t cached_block = -1;
        float am = 0.f;
        for (int64_t k = lane; k < K; k += 32) {
          const int64_t f = row_flat + k;
          const int64_t b = f >> p.log2bs;
          if (b != cached_block) {  // a lane changes block every blocksize / 32 steps
            am = block_absmax(p.w, b);
            cached_block = b;
          }
          const float wk = __fmul_rn(s_table[byte_code(__ldg(codes + (f >> 1)), f)], am);
#pragma unroll
          for (int j = 0; j < MT; ++j)
            if (j < mt) acc[j] = fmaf(to_f32(xt[int64_t(j) * p.ldx + k]), wk, acc[j]);
        }
      }

      if (p.v != nullptr) {  // adapter term: lanes split R, summed by the same reduction
        for (int64_t r = lane; r < p.R; r += 32) {
          const float er = p.scale * load_f32(p.e, n * p.lde + r, p.e_dtype);
#pragma unroll
          for (int j = 0; j < MT; ++j)
            if (j < mt) acc[j] = fmaf(er, p.v[(m0 + j) * p.ldv + r], acc[j]);
        }
      }

#pragma unroll
      for (int j = 0; j < MT; ++j) acc[j] = warp_sum(acc[j]);
      const float b = p.bias != nullptr ? load_f32(p.bias, n, p.bias_dtype) : 0.f;
#pragma unroll
      for (int j = 0; j < MT; ++j)
        if (lane == j && j < mt) store_f32(p.out, (m0 + j) * p.ldo + n, p.out_dtype, acc[j] + b);
    }
  }
}

// ---- launchers ---------------------------------------------------------------------------------------

template <class T>
void launch_quantize(const Nf4QuantizeArgs& a, cudaStream_t stream) {
  const int log2bs = log2_pow2(a.blocksize);
  const int64_t nblocks = (a.n + a.blocksize - 1) / a.blocksize;
  const dim3 grid(static_cast<unsigned>(grid_blocks(nblocks, kQuantWarps)));
  nf4_quantize_kernel<T><<<grid, kQuantWarps * 32, 0, stream>>>(
      reinterpret_cast<const T*>(a.input), a.n, log2bs, reinterpret_cast<uint8_t*>(a.codes),
      reinterpret_cast<float*>(a.absmax), reinterpret_cast<int*>(a.status));
  check_launch("nf4_quantize_kernel");
}

template <class TO>
void launch_dequantize(const Nf4DequantizeArgs& a, cudaStream_t stream) {
  const int log2bs = log2_pow2(a.w.blocksize);
  const int64_t rows = a.out.rows, cols = a.w.cols;
  TO* out = a.out.data<TO>();
  if (cols % 8 == 0 && aligned(a.w.codes, 4)) {
    const dim3 grid(static_cast<unsigned>(grid_blocks(rows * (cols / 8), kDequantThreads)));
    nf4_dequantize_vec_kernel<TO><<<grid, kDequantThreads, 0, stream>>>(a.w, log2bs, a.row0, rows, out, a.out.ld,
                                                                        rows_aligned16(a.out));
    check_launch("nf4_dequantize_vec_kernel");
  } else {
    const dim3 grid(static_cast<unsigned>(grid_blocks(rows * cols, kDequantThreads)));
    nf4_dequantize_scalar_kernel<TO><<<grid, kDequantThreads, 0, stream>>>(a.w, log2bs, a.row0, rows, out, a.out.ld);
    check_launch("nf4_dequantize_scalar_kernel");
  }
}

template <class T, int MT>
void launch_rows_tile(const RowsParams& p, bool fast, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(grid_blocks(p.N, kRowsWarps)));
  if (fast)
    nf4_rows_kernel<T, MT, true><<<grid, kRowsWarps * 32, 0, stream>>>(p);
  else
    nf4_rows_kernel<T, MT, false><<<grid, kRowsWarps * 32, 0, stream>>>(p);
  check_launch("nf4_rows_kernel");
}

// Token rows per pass: the smallest tile that holds M (so M = 1, the decode case, carries no unused
// accumulators), capped at 16 (16 accumulators + 32 decoded weights per lane fit the register budget;
// larger M loops over tiles).
template <class T>
void launch_rows(const RowsParams& p, bool fast, cudaStream_t stream) {
  if (p.M <= 1) return launch_rows_tile<T, 1>(p, fast, stream);
  if (p.M <= 2) return launch_rows_tile<T, 2>(p, fast, stream);
  if (p.M <= 4) return launch_rows_tile<T, 4>(p, fast, stream);
  if (p.M <= 8) return launch_rows_tile<T, 8>(p, fast, stream);
  return launch_rows_tile<T, 16>(p, fast, stream);
}

}  // namespace
}  // namespace lowrank::cuda

namespace lowrank {

void nf4_quantize_cuda(const Nf4QuantizeArgs& a, std::uintptr_t stream_handle) {
  validate_nf4_quantize(a, /*cuda=*/true);
  if (a.n == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  switch (a.dtype) {
    case DType::float32: return cuda::launch_quantize<float>(a, stream);
    case DType::bfloat16: return cuda::launch_quantize<__nv_bfloat16>(a, stream);
    case DType::float16: return cuda::launch_quantize<__half>(a, stream);
    default: fail(std::string("weight: unsupported dtype ") + dtype_name(a.dtype));
  }
}

void nf4_double_quant_cuda(const Nf4DoubleQuantArgs& a, std::uintptr_t stream_handle) {
  validate_nf4_double_quant(a, /*cuda=*/true);
  if (a.n == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  const int64_t ngroups = (a.n + a.blocksize2 - 1) / a.blocksize2;
  const dim3 grid(static_cast<unsigned>(cuda::grid_blocks(ngroups, 1)));
  cuda::nf4_double_quant_kernel<<<grid, cuda::kDqThreads, 0, stream>>>(
      reinterpret_cast<const float*>(a.absmax), a.n, reinterpret_cast<const float*>(a.offset),
      reinterpret_cast<const float*>(a.code2), a.blocksize2, reinterpret_cast<uint8_t*>(a.qabsmax),
      reinterpret_cast<float*>(a.absmax2));
  cuda::check_launch("nf4_double_quant_kernel");
}

void nf4_dequantize_cuda(const Nf4DequantizeArgs& a, std::uintptr_t stream_handle) {
  validate_nf4_dequantize(a, /*cuda=*/true);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  switch (a.out.dtype) {
    case DType::float32: return cuda::launch_dequantize<float>(a, stream);
    case DType::bfloat16: return cuda::launch_dequantize<__nv_bfloat16>(a, stream);
    case DType::float16: return cuda::launch_dequantize<__half>(a, stream);
    default: fail(std::string("out: unsupported dtype ") + dtype_name(a.out.dtype));
  }
}

void nf4_rows_cuda(const Nf4RowsArgs& a, std::uintptr_t stream_handle) {
  validate_nf4_rows(a, /*cuda=*/true);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);

  cuda::RowsParams p{};
  p.out = reinterpret_cast<void*>(a.out.ptr);
  p.ldo = a.out.ld;
  p.out_dtype = a.out.dtype;
  p.x = reinterpret_cast<const void*>(a.x.ptr);
  p.ldx = a.x.ld;
  p.w = a.w;
  p.log2bs = cuda::log2_pow2(a.w.blocksize);
  p.bias = a.bias.ptr ? reinterpret_cast<const void*>(a.bias.ptr) : nullptr;
  p.bias_dtype = a.bias.dtype;
  p.v = a.v.ptr ? reinterpret_cast<const float*>(a.v.ptr) : nullptr;
  p.ldv = a.v.ld;
  p.e = a.e.ptr ? reinterpret_cast<const void*>(a.e.ptr) : nullptr;
  p.lde = a.e.ld;
  p.e_dtype = a.e.dtype;
  p.scale = a.scale;
  p.M = a.x.rows;
  p.R = a.v.ptr ? a.v.cols : 0;
  p.N = a.w.rows;
  p.K = a.w.cols;
  // Fast path: every lane's 32-code run starts 16-byte aligned and lies inside one block (see the top),
  // and so does its slice of each x row. Anything else (odd K, offset views) takes the general path.
  const bool fast = p.K % 32 == 0 && cuda::aligned(a.w.codes, 16) && cuda::rows_aligned16(a.x);

  switch (a.x.dtype) {
    case DType::float32: return cuda::launch_rows<float>(p, fast, stream);
    case DType::bfloat16: return cuda::launch_rows<__nv_bfloat16>(p, fast, stream);
    case DType::float16: return cuda::launch_rows<__half>(p, fast, stream);
    default: fail(std::string("x: unsupported dtype ") + dtype_name(a.x.dtype));
  }
}

}  // namespace lowrank
