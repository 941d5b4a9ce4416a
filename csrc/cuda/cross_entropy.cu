// Cross-entropy over logits rows on CUDA (csrc/loss.h has the math). One block per row: its threads
// stride over the row for the max, reduce it, then for Σ exp(x − max), reduce that (warp shuffles, then
// one shared-memory pass); the backward's threads write the row's gradient in the same stride. fp32
// throughout (expf), one rounding to the logits' dtype. A label outside [0, V) that is not ignore_index
// gives a NaN loss and a NaN gradient row rather than a read out of bounds (the Python side checks the
// labels before it launches, so this is a last guard).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/convert.cuh"
#include "cuda/cuda_common.h"
#include "loss.h"

namespace lowrank::cuda {
namespace {

constexpr int kThreads = 256;

// The block's max (kMax) or sum of v, returned to every thread. NaN propagates through the max.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* shared) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? ((v != v || o != o) ? __int_as_float(0x7fc00000) : fmaxf(v, o)) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? shared[lane] : (kMax ? -INFINITY : 0.0f);
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = kMax ? ((v != v || o != o) ? __int_as_float(0x7fc00000) : fmaxf(v, o)) : v + o;
    }
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

template <class T>
__global__ void __launch_bounds__(kThreads)
cross_entropy_kernel(const T* __restrict__ logits, int64_t ld, int64_t V, const int64_t* __restrict__ labels,
                     float* __restrict__ loss, float* __restrict__ lse, int64_t ignore_index) {
  __shared__ float shared[kThreads / 32];
  const int64_t i = blockIdx.x;
  const int64_t c = labels[i];
  if (c == ignore_index) {
    if (threadIdx.x == 0) loss[i] = lse[i] = 0.0f;
    return;
  }
  const T* x = logits + i * ld;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = to_f32(x[j]);
    m = (v != v || m != m) ? __int_as_float(0x7fc00000) : fmaxf(m, v);
  }
  m = block_reduce<true>(m, shared);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) s += expf(to_f32(x[j]) - m);
  s = block_reduce<false>(s, shared);
  if (threadIdx.x == 0) {
    const float log_sum = logf(s);
    lse[i] = m + log_sum;
    loss[i] = (c >= 0 && c < V) ? (m - to_f32(x[c])) + log_sum : __int_as_float(0x7fc00000);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
cross_entropy_backward_kernel(T* grad, int64_t ldg, const T* logits, int64_t ld, int64_t V,  // may alias: in place
                              const int64_t* __restrict__ labels, const float* __restrict__ lse,
                              const float* __restrict__ grad_loss, int64_t ignore_index) {
  const int64_t i = blockIdx.x;
  const int64_t c = labels[i];
  T* g = grad + i * ldg;
  if (c == ignore_index) {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = from_f32<T>(0.0f);
    return;
  }
  const T* x = logits + i * ld;
  const float l = lse[i];
  const float s = (c >= 0 && c < V) ? grad_loss[i] : __int_as_float(0x7fc00000);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float p = expf(to_f32(x[j]) - l);
    g[j] = from_f32<T>((j == c ? p - 1.0f : p) * s);
  }
}

template <class T>
void launch_forward(const CrossEntropyArgs& a, cudaStream_t stream) {
  cross_entropy_kernel<T><<<dim3(unsigned(a.logits.rows)), kThreads, 0, stream>>>(
      a.logits.data<const T>(), a.logits.ld, a.logits.cols, a.labels.data<const int64_t>(), a.loss.data<float>(),
      a.lse.data<float>(), a.ignore_index);
  check_launch("cross_entropy_kernel");
}

template <class T>
void launch_backward(const CrossEntropyBackwardArgs& a, cudaStream_t stream) {
  cross_entropy_backward_kernel<T><<<dim3(unsigned(a.logits.rows)), kThreads, 0, stream>>>(
      a.grad.data<T>(), a.grad.ld, a.logits.data<const T>(), a.logits.ld, a.logits.cols,
      a.labels.data<const int64_t>(), a.lse.data<const float>(), a.grad_loss.data<const float>(), a.ignore_index);
  check_launch("cross_entropy_backward_kernel");
}

}  // namespace
}  // namespace lowrank::cuda

namespace lowrank {

// Rows go to grid.x, which holds up to 2^31 - 1 blocks.
static void check_rows_cuda(int64_t rows) {
  LOWRANK_CHECK(rows < (int64_t(1) << 31), "logits: more than 2^31 - 1 rows for one CUDA launch");
}

void cross_entropy_cuda(const CrossEntropyArgs& a, std::uintptr_t stream_handle) {
  validate_cross_entropy(a, /*cuda=*/true);
  check_rows_cuda(a.logits.rows);
  if (a.logits.rows == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  switch (a.logits.dtype) {
    case DType::float32: return cuda::launch_forward<float>(a, stream);
    case DType::bfloat16: return cuda::launch_forward<__nv_bfloat16>(a, stream);
    case DType::float16: return cuda::launch_forward<__half>(a, stream);
    default: fail(std::string("logits: unsupported dtype ") + dtype_name(a.logits.dtype));
  }
}

void cross_entropy_backward_cuda(const CrossEntropyBackwardArgs& a, std::uintptr_t stream_handle) {
  validate_cross_entropy_backward(a, /*cuda=*/true);
  check_rows_cuda(a.logits.rows);
  if (a.logits.rows == 0 || a.logits.cols == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  switch (a.logits.dtype) {
    case DType::float32: return cuda::launch_backward<float>(a, stream);
    case DType::bfloat16: return cuda::launch_backward<__nv_bfloat16>(a, stream);
    case DType::float16: return cuda::launch_backward<__half>(a, stream);
    default: fail(std::string("logits: unsupported dtype ") + dtype_name(a.logits.dtype));
  }
}

}  // namespace lowrank
