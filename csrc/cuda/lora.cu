// Fused LoRA rows on CUDA, the few-token path (the Python dispatcher sends many tokens to cuBLAS).
//
//   out[m, n] = sum_k x[m, k] * w[n, k]  +  scale * c[n] * sum_j v[m, j] * s[j] * e[n, j]  +  bias[n]
//
//   x    [M, K]  w's dtype                     out  [M, N]  fp32 or w's dtype
//   w    [N, K]  fp32 / bf16 / fp16            v    [M, R]  fp32 (u = A x), optional
//   bias [N]     w's dtype, optional           e    [N, R]  fp32 or w's dtype (rows of B), optional
//   c    [N]     fp32 (VeRA's b), optional      s    [R]     fp32 (VeRA's d), optional
//
// One warp per output row n: its lanes stream w[n, :] once with 16-byte loads (when w and x rows are
// 16-byte aligned; a scalar loop otherwise), keep MT fp32 partial dots (one per x row) in registers,
// add the adapter term's partial products for the same row, and reduce once with shuffles. Decoding
// is memory-bound: the whole job is to keep enough 16-byte loads in flight (8 warps per block, one
// row each, ~N/8 blocks). Accumulation is fp32, one rounding to out's dtype at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/convert.cuh"
#include "cuda/cuda_common.h"
#include "lora.h"

namespace lowrank::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMTile = 8;  // x rows per pass over a w row; larger M loops over tiles

// 16 bytes of T as fp32: 4 floats or 8 halves.
template <class T>
struct Vec16 {
  static constexpr int n = 16 / sizeof(T);
  float f[n];
  __device__ __forceinline__ void load(const T* p) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < n; ++i) f[i] = to_f32(h[i]);
  }
};

template <class T, class TE, class TO, bool kVec16>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
lora_rows_kernel(TO* __restrict__ out, int64_t ldo,          // [M, N]
                 const T* __restrict__ x, int64_t ldx,       // [M, K]
                 const T* __restrict__ w, int64_t ldw,       // [N, K]
                 const T* __restrict__ bias,                 // [N] or null
                 const float* __restrict__ v, int64_t ldv,   // [M, R] or null
                 const TE* __restrict__ e, int64_t lde,      // [N, R] or null
                 const float* __restrict__ col_scale,        // [N] or null
                 const float* __restrict__ v_scale,          // [R] or null
                 float scale, int M, int64_t N, int64_t K, int R) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const T* wrow = w + n * ldw;
  for (int m0 = 0; m0 < M; m0 += kMTile) {
    const int mt = min(kMTile, M - m0);
    float acc[kMTile];
#pragma unroll
    for (int j = 0; j < kMTile; ++j) acc[j] = 0.f;
    if constexpr (kVec16) {
      constexpr int V = Vec16<T>::n;
      for (int64_t k = int64_t(lane) * V; k < K; k += 32 * V) {
        Vec16<T> wv;
        wv.load(wrow + k);
#pragma unroll
        for (int j = 0; j < kMTile; ++j) {
          if (j < mt) {
            Vec16<T> xv;
            xv.load(x + (m0 + j) * ldx + k);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[j] = fmaf(wv.f[i], xv.f[i], acc[j]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float wk = to_f32(wrow[k]);
#pragma unroll
        for (int j = 0; j < kMTile; ++j)
          if (j < mt) acc[j] = fmaf(wk, to_f32(x[(m0 + j) * ldx + k]), acc[j]);
      }
    }
    if (v != nullptr) {  // adapter term: lanes split R, summed by the same reduction
      const float sn = col_scale != nullptr ? scale * col_scale[n] : scale;
      for (int r = lane; r < R; r += 32) {
        const float er = sn * to_f32(e[n * lde + r]) * (v_scale != nullptr ? v_scale[r] : 1.f);
#pragma unroll
        for (int j = 0; j < kMTile; ++j)
          if (j < mt) acc[j] = fmaf(er, v[(m0 + j) * ldv + r], acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kMTile; ++j) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
    }
    const float b = bias != nullptr ? to_f32(bias[n]) : 0.f;
#pragma unroll
    for (int j = 0; j < kMTile; ++j)
      if (lane == j && j < mt) out[(m0 + j) * ldo + n] = from_f32<TO>(acc[j] + b);
  }
}

bool aligned16(const Matrix& m) {
  const int64_t row_bytes = m.ld * dtype_size(m.dtype);
  return (m.ptr % 16 == 0) && (m.rows <= 1 || row_bytes % 16 == 0);
}

template <class T, class TE, class TO>
void launch(const LoraRowsArgs& a, cudaStream_t stream) {
  const int M = int(a.x.rows);
  const int64_t K = a.x.cols, N = a.w.rows;
  const int R = a.v.ptr ? int(a.v.cols) : 0;
  const dim3 grid(unsigned((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  const bool vec = aligned16(a.w) && aligned16(a.x) && K % (16 / sizeof(T)) == 0;
  auto* out = a.out.data<TO>();
  auto* x = a.x.data<const T>();
  auto* w = a.w.data<const T>();
  auto* bias = a.bias.ptr ? a.bias.data<const T>() : nullptr;
  auto* v = a.v.ptr ? a.v.data<const float>() : nullptr;
  auto* e = a.e.ptr ? a.e.data<const TE>() : nullptr;
  auto* col_scale = a.col_scale.ptr ? a.col_scale.data<const float>() : nullptr;
  auto* v_scale = a.v_scale.ptr ? a.v_scale.data<const float>() : nullptr;
  if (vec)
    lora_rows_kernel<T, TE, TO, true><<<grid, block, 0, stream>>>(out, a.out.ld, x, a.x.ld, w, a.w.ld, bias, v,
                                                                  a.v.ld, e, a.e.ld, col_scale, v_scale, a.scale, M, N, K, R);
  else
    lora_rows_kernel<T, TE, TO, false><<<grid, block, 0, stream>>>(out, a.out.ld, x, a.x.ld, w, a.w.ld, bias, v,
                                                                   a.v.ld, e, a.e.ld, col_scale, v_scale, a.scale, M, N, K, R);
  check_launch("lora_rows_kernel");
}

template <class T>
void launch_for(const LoraRowsArgs& a, cudaStream_t stream) {
  const bool e_f32 = a.e.ptr == 0 || a.e.dtype == DType::float32;
  const bool o_f32 = a.out.dtype == DType::float32;
  if (e_f32 && o_f32) return launch<T, float, float>(a, stream);
  if (e_f32) return launch<T, float, T>(a, stream);
  if (o_f32) return launch<T, T, float>(a, stream);
  return launch<T, T, T>(a, stream);
}

}  // namespace
}  // namespace lowrank::cuda

namespace lowrank {

void lora_rows_cuda(const LoraRowsArgs& a, std::uintptr_t stream_handle) {
  validate_lora_rows(a, /*cuda=*/true);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  // The caller (Python) runs this under the tensors' device and passes that device's current stream.
  cudaStream_t stream = cuda::as_stream(stream_handle);
  switch (a.w.dtype) {
    case DType::float32: return cuda::launch<float, float, float>(a, stream);
    case DType::bfloat16: return cuda::launch_for<__nv_bfloat16>(a, stream);
    case DType::float16: return cuda::launch_for<__half>(a, stream);
    default: fail(std::string("w: unsupported dtype ") + dtype_name(a.w.dtype));
  }
}

}  // namespace lowrank
