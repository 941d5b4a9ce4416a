// Mixed-adapter rows on CUDA (csrc/mixed.h is the contract; csrc/cpu/mixed.cpp the CPU twin).
//
//   out[m, :] = c[m, :] + x[m] Wᵀ + bias + T_a(m)(xa[m])
//   T_i(z)    = col_scale_i ⊙ ( e_i · (scale_i · v_scale_i ⊙ (a_i · z)) )
//
// Launches, all on the caller's stream (punica's BGMV/SGMV split into shrink and expand):
//   1. mixed_plan_check_kernel  order must be a permutation (in range, each row seen once: atomic
//      counts in a zeroed seen[M]), offsets non-decreasing from 0 to at most M. It ORs flags into a
//      status word and copies offsets next to it; the host reads both back in ONE copy + stream sync
//      and raises ValueError on a lie before any kernel trusts the plan. The host then knows every
//      segment, which sizes the grids below exactly.
//   2. mixed_shrink_kernel (BGMV shrink)  v[p, j] = scale_i * v_scale_i[j] * (a_i[j] · xa[order[p]]) in
//      fp32 for the P = offsets[A] positions with an adapter; h[p, j] = the unscaled dot (zeros past r_i).
//      One warp per (position, 8 rank rows): a lane's 8 xa values feed 8 a rows, 16-byte loads.
//   3a. w given (few tokens, decode): mixed_fused_kernel, lora.cu's kernel with a per-row adapter. One
//      warp per output column n streams w[n, :] once per tile of 8 positions (16-byte loads, fp32
//      partial dots in registers), adds each row's own term col_scale[n] * sum_j e_i[n, j] v[p, j]
//      (lanes split j, the same shuffle reduction), then c and bias: one rounding to out's dtype.
//   3b. w absent (prefill: cuBLAS ran the base GEMM, c holds it): mixed_expand_kernel (SGMV expand).
//      A block owns 32 positions of ONE segment (so one adapter) and 64 columns; it stages v rows
//      and the e tile (rows n0..n0+63, coalesced) in shared memory per rank chunk of 64, each thread
//      accumulates 8 outputs. The no-adapter segment's blocks write c + bias only.
//
// The adapter table (pointers, lds, ranks, dtype tags, scales) and the checked plan travel as ONE
// __grid_constant__ kernel parameter (~10 KB: CUDA 12.1+ allows 32 KB on sm_70+), so at most
// kMaxAdapters adapters per call. Lookups position -> adapter are binary searches over that copy of
// offsets (warp-uniform). a and e may be fp32, bf16 or fp16 independently per adapter: a runtime
// tag, warp/block-uniform branches. Scratch (seen[], status, v[P, max_r]) comes from
// cudaMallocAsync on the stream and is freed there (stream-ordered) on every exit path.
// Accumulation is fp32 throughout; out is rounded once. Unaligned rows (or K % 8 != 0) take scalar
// loops, like lora.cu. Tile sizes follow lora.cu and punica's defaults; NOT yet measured on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/convert.cuh"
#include "cuda/cuda_common.h"
#include "mixed.h"

namespace lowrank::cuda {
namespace {

constexpr int kMaxAdapters = 128;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;   // shrink and fused kernels: one job per warp
constexpr int kMTile = 8;           // fused: positions per pass over a w row (larger M loops)
constexpr int kJTile = 8;           // shrink: rank rows per warp sharing one read of xa
constexpr int kExpandN = 64;        // expand: columns per block (one per thread of a row group)
constexpr int kExpandP = 32;        // expand: positions per block, all in one segment
constexpr int kExpandR = 64;        // expand: rank chunk staged in shared memory
constexpr int kExpandThreads = 256;
constexpr int kExpandGroups = kExpandThreads / kExpandN;      // 4 row groups
constexpr int kExpandRows = kExpandP / kExpandGroups;         // 8 outputs per thread
constexpr int64_t kMaxGridBlocks = int64_t(1) << 20;          // grid-stride loops cap their grids here

enum : int { kF32 = int(DType::float32), kBF16 = int(DType::bfloat16), kF16 = int(DType::float16) };
enum : int { kBadRange = 1, kDuplicate = 2, kBadFirst = 4, kDecreasing = 8, kPastM = 16 };

struct AdapterDesc {
  const void* a;             // [r, K], a_dtype
  const void* e;             // [N, r], e_dtype
  const float* v_scale;      // [r] or null
  const float* col_scale;    // [N] or null
  int64_t lda, lde;
  int r, a_dtype, e_dtype, a_vec;  // a_vec: a's rows 16-byte aligned
  float scale;
};

struct Plan {
  int A;
  int offsets[kMaxAdapters + 1];     // the checked device offsets
  int tile_start[kMaxAdapters + 2];  // expand: first block of segment s (A = the no-adapter rows)
  AdapterDesc ad[kMaxAdapters];
};
static_assert(sizeof(Plan) + 256 < 32764, "kernel parameters are limited to 32764 bytes");

// ---- device helpers -------------------------------------------------------------------------------

// Element i of a buffer whose dtype is a runtime tag.
__device__ __forceinline__ float load_f32(const void* p, int dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  if (dtype == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

// V consecutive elements as fp32 with 16-byte loads (p 16-byte aligned, V * sizeof(T) % 16 == 0).
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[V]) {
  constexpr int per = 16 / int(sizeof(T));
#pragma unroll
  for (int q = 0; q < V / per; ++q) {
    const uint4 raw = reinterpret_cast<const uint4*>(p)[q];
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < per; ++i) f[q * per + i] = to_f32(t[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// The segment holding index p: the largest s in [0, n] with starts[s] <= p (empty segments repeat
// a start, so taking the largest skips them). Requires starts[0] <= p.
__device__ __forceinline__ int segment_of(const int* starts, int n, int64_t p) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= p) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ---- 1. plan check ---------------------------------------------------------------------------------

__global__ void mixed_plan_check_kernel(const int* __restrict__ order, const int* __restrict__ offsets, int M,
                                        int A, int64_t n, int* __restrict__ status, int* __restrict__ seen) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int flags = 0;
    if (i < M) {
      const int m = order[i];
      if (m < 0 || m >= M) flags |= kBadRange;
      else if (atomicAdd(&seen[m], 1) != 0) flags |= kDuplicate;
    }
    if (i <= A) {
      const int o = offsets[i];
      status[1 + i] = o;
      if (i == 0 && o != 0) flags |= kBadFirst;
      if (i > 0 && offsets[i - 1] > o) flags |= kDecreasing;
      if (i == A && o > M) flags |= kPastM;
    }
    if (flags != 0) atomicOr(status, flags);
  }
}

// ---- 2. shrink -------------------------------------------------------------------------------------

// acc[j] += this lane's share of a[j, :] · xrow for j < jn.
template <class T, class TA, bool kVec>
__device__ __forceinline__ void shrink_dots(const T* xrow, const TA* a, int64_t lda, int jn, int64_t K, int lane,
                                            float (&acc)[kJTile]) {
  if constexpr (kVec) {
    for (int64_t k = int64_t(lane) * 8; k < K; k += 32 * 8) {
      float xf[8];
      load_vec<T, 8>(xrow + k, xf);
#pragma unroll
      for (int j = 0; j < kJTile; ++j) {
        if (j < jn) {
          float af[8];
          load_vec<TA, 8>(a + j * lda + k, af);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[j] = fmaf(xf[i], af[i], acc[j]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float xk = to_f32(xrow[k]);
#pragma unroll
      for (int j = 0; j < kJTile; ++j)
        if (j < jn) acc[j] = fmaf(xk, to_f32(a[j * lda + k]), acc[j]);
    }
  }
}

template <class T, bool kVec>
__device__ __forceinline__ void shrink_dispatch(const AdapterDesc& ad, const T* xrow, int j0, int jn, int64_t K,
                                                int lane, float (&acc)[kJTile]) {
  const int64_t off = int64_t(j0) * ad.lda;
  if (ad.a_dtype == kF32)
    shrink_dots<T, float, kVec>(xrow, static_cast<const float*>(ad.a) + off, ad.lda, jn, K, lane, acc);
  else if (ad.a_dtype == kBF16)
    shrink_dots<T, __nv_bfloat16, kVec>(xrow, static_cast<const __nv_bfloat16*>(ad.a) + off, ad.lda, jn, K, lane, acc);
  else
    shrink_dots<T, __half, kVec>(xrow, static_cast<const __half*>(ad.a) + off, ad.lda, jn, K, lane, acc);
}

// kVec: xa's rows are 16-byte aligned and K % 8 == 0 (each adapter adds its own a_vec).
template <class T, bool kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
mixed_shrink_kernel(const __grid_constant__ Plan plan, const T* __restrict__ xa, int64_t ldxa,
                    const int* __restrict__ order, float* __restrict__ v, int ldv,  // v [P, max_r]
                    float* __restrict__ h, int64_t ldh, int64_t P, int groups, int max_r, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t jobs = P * groups;
  for (int64_t job = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); job < jobs;
       job += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t p = job / groups;
    const int j0 = int(job % groups) * kJTile;
    const AdapterDesc& ad = plan.ad[segment_of(plan.offsets, plan.A, p)];
    const int jn = min(kJTile, ad.r - j0);  // <= 0: this group only zeroes h's padding
    float acc[kJTile] = {};
    if (jn > 0) {
      const T* xrow = xa + int64_t(order[p]) * ldxa;
      if (kVec && ad.a_vec) shrink_dispatch<T, true>(ad, xrow, j0, jn, K, lane, acc);
      else shrink_dispatch<T, false>(ad, xrow, j0, jn, K, lane, acc);
#pragma unroll
      for (int j = 0; j < kJTile; ++j) acc[j] = warp_sum(acc[j]);
    }
#pragma unroll
    for (int j = 0; j < kJTile; ++j) {
      const int col = j0 + j;
      if (lane != j) continue;
      if (j < jn) {
        v[p * ldv + col] = ad.scale * (ad.v_scale != nullptr ? ad.v_scale[col] : 1.f) * acc[j];
        if (h != nullptr) h[p * ldh + col] = acc[j];
      } else if (h != nullptr && col < max_r) {
        h[p * ldh + col] = 0.f;
      }
    }
  }
}

// ---- 3a. fused rows (w given) ------------------------------------------------------------------------

// kVec: w and x rows 16-byte aligned and K a multiple of 16 / sizeof(T). out and c may alias: no
// __restrict__ on either (each element is read, then written, by the same lane).
template <class T, class TO, bool kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
mixed_fused_kernel(const __grid_constant__ Plan plan, TO* out, int64_t ldo, const float* c, int64_t ldc,
                   const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw,
                   const T* __restrict__ bias, const float* __restrict__ v, int ldv,
                   const int* __restrict__ order, int M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const T* wrow = w + n * ldw;
  const float b = bias != nullptr ? to_f32(bias[n]) : 0.f;
  for (int p0 = 0; p0 < M; p0 += kMTile) {
    const int mt = min(kMTile, M - p0);
    int rows[kMTile];
    float acc[kMTile];
#pragma unroll
    for (int j = 0; j < kMTile; ++j) {
      rows[j] = j < mt ? order[p0 + j] : 0;
      acc[j] = 0.f;
    }
    if constexpr (kVec) {
      constexpr int V = 16 / int(sizeof(T));
      for (int64_t k = int64_t(lane) * V; k < K; k += 32 * V) {
        float wf[V];
        load_vec<T, V>(wrow + k, wf);
#pragma unroll
        for (int j = 0; j < kMTile; ++j) {
          if (j < mt) {
            float xf[V];
            load_vec<T, V>(x + int64_t(rows[j]) * ldx + k, xf);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[j] = fmaf(wf[i], xf[i], acc[j]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float wk = to_f32(wrow[k]);
#pragma unroll
        for (int j = 0; j < kMTile; ++j)
          if (j < mt) acc[j] = fmaf(wk, to_f32(x[int64_t(rows[j]) * ldx + k]), acc[j]);
      }
    }
    // Adapter terms: positions are sorted by segment, so find p0's and walk forward.
    int s = segment_of(plan.offsets, plan.A, p0);
#pragma unroll
    for (int j = 0; j < kMTile; ++j) {
      if (j >= mt) break;
      const int p = p0 + j;
      while (s < plan.A && plan.offsets[s + 1] <= p) ++s;
      if (s < plan.A) {
        const AdapterDesc& ad = plan.ad[s];
        float t = 0.f;
        for (int q = lane; q < ad.r; q += 32)
          t = fmaf(load_f32(ad.e, ad.e_dtype, n * ad.lde + q), v[int64_t(p) * ldv + q], t);
        acc[j] = fmaf(ad.col_scale != nullptr ? ad.col_scale[n] : 1.f, t, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kMTile; ++j) acc[j] = warp_sum(acc[j]);
#pragma unroll
    for (int j = 0; j < kMTile; ++j) {
      if (lane == j && j < mt) {
        float r = acc[j] + b;
        if (c != nullptr) r += c[int64_t(rows[j]) * ldc + n];
        out[int64_t(rows[j]) * ldo + n] = from_f32<TO>(r);
      }
    }
  }
}

// ---- 3b. expand (w absent) ---------------------------------------------------------------------------

// Grid: x = tiles of kExpandP positions inside one segment (plan.tile_start), y = column tiles (grid-
// stride). Every branch around __syncthreads is block-uniform.
template <class TO>
__global__ void __launch_bounds__(kExpandThreads)
mixed_expand_kernel(const __grid_constant__ Plan plan, TO* out, int64_t ldo, const float* c, int64_t ldc,
                    const TO* __restrict__ bias, const float* __restrict__ v, int ldv,
                    const int* __restrict__ order, int M, int64_t N) {
  __shared__ float se[kExpandN][kExpandR + 1];  // e tile, padded: lanes read different rows
  __shared__ float sv[kExpandP][kExpandR];      // v rows, read as broadcasts
  const int tile = int(blockIdx.x);
  const int s = segment_of(plan.tile_start, plan.A, tile);
  const int p0 = plan.offsets[s] + (tile - plan.tile_start[s]) * kExpandP;
  const int np = min(kExpandP, (s < plan.A ? plan.offsets[s + 1] : M) - p0);
  const int tx = int(threadIdx.x) % kExpandN, ty = int(threadIdx.x) / kExpandN;
  for (int64_t n0 = int64_t(blockIdx.y) * kExpandN; n0 < N; n0 += int64_t(gridDim.y) * kExpandN) {
    const int64_t n = n0 + tx;
    float acc[kExpandRows] = {};
    float cs = 1.f;
    if (s < plan.A) {
      const AdapterDesc& ad = plan.ad[s];
      for (int j0 = 0; j0 < ad.r; j0 += kExpandR) {
        const int rc = min(kExpandR, ad.r - j0);
        __syncthreads();  // the previous chunk's readers are done
        for (int t = threadIdx.x; t < kExpandP * rc; t += kExpandThreads) {
          const int i = t / rc, q = t % rc;
          sv[i][q] = i < np ? v[int64_t(p0 + i) * ldv + j0 + q] : 0.f;
        }
        for (int t = threadIdx.x; t < kExpandN * rc; t += kExpandThreads) {
          const int i = t / rc, q = t % rc;  // consecutive threads: consecutive e elements
          se[i][q] = n0 + i < N ? load_f32(ad.e, ad.e_dtype, (n0 + i) * ad.lde + j0 + q) : 0.f;
        }
        __syncthreads();
        for (int q = 0; q < rc; ++q) {
          const float ev = se[tx][q];
#pragma unroll
          for (int i = 0; i < kExpandRows; ++i) acc[i] = fmaf(sv[ty + i * kExpandGroups][q], ev, acc[i]);
        }
      }
      if (ad.col_scale != nullptr && n < N) cs = ad.col_scale[n];
    }
    if (n < N) {
      const float b = bias != nullptr ? to_f32(bias[n]) : 0.f;
#pragma unroll
      for (int i = 0; i < kExpandRows; ++i) {
        const int row = ty + i * kExpandGroups;
        if (row < np) {
          const int64_t m = order[p0 + row];
          float r = cs * acc[i] + b;
          if (c != nullptr) r += c[m * ldc + n];
          out[m * ldo + n] = from_f32<TO>(r);
        }
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------------

bool aligned16(const Matrix& m) {
  const int64_t row_bytes = m.ld * dtype_size(m.dtype);
  return (m.ptr % 16 == 0) && (m.rows <= 1 || row_bytes % 16 == 0);
}

unsigned grid_for(int64_t items, int64_t per_block) {
  return unsigned(std::max<int64_t>(1, std::min(kMaxGridBlocks, (items + per_block - 1) / per_block)));
}

// Stream-ordered scratch, freed on the stream when the launcher returns or throws.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : stream_(s) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    for (void* p : ptrs_) cudaFreeAsync(p, stream_);
  }
  template <class U>
  U* alloc(int64_t count) {
    void* p = nullptr;
    check_cuda(cudaMallocAsync(&p, size_t(std::max<int64_t>(count, 1)) * sizeof(U), stream_), "cudaMallocAsync");
    ptrs_.push_back(p);
    return static_cast<U*>(p);
  }

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
};

template <class T, class TO>
void launch_out(const MixedRowsArgs& a, const Plan& plan, const int* order, const float* v, int ldv,
                cudaStream_t stream) {
  const int M = int(a.x.rows);
  const int64_t K = a.x.cols, N = a.out.cols;
  auto* out = a.out.data<TO>();
  const float* c = a.c.ptr ? a.c.data<const float>() : nullptr;
  if (a.w.ptr) {
    const dim3 grid(unsigned((N + kWarpsPerBlock - 1) / kWarpsPerBlock)), block(kWarpsPerBlock * 32);
    const bool vec = aligned16(a.w) && aligned16(a.x) && K % (16 / int64_t(sizeof(T))) == 0;
    auto* x = a.x.data<const T>();
    auto* w = a.w.data<const T>();
    auto* bias = a.bias.ptr ? a.bias.data<const T>() : nullptr;
    if (vec)
      mixed_fused_kernel<T, TO, true><<<grid, block, 0, stream>>>(plan, out, a.out.ld, c, a.c.ld, x, a.x.ld, w, a.w.ld,
                                                                  bias, v, ldv, order, M, N, K);
    else
      mixed_fused_kernel<T, TO, false><<<grid, block, 0, stream>>>(plan, out, a.out.ld, c, a.c.ld, x, a.x.ld, w,
                                                                   a.w.ld, bias, v, ldv, order, M, N, K);
    check_launch("mixed_fused_kernel");
  } else {
    const int64_t col_tiles = (N + kExpandN - 1) / kExpandN;
    const dim3 grid(unsigned(plan.tile_start[plan.A + 1]), unsigned(std::min<int64_t>(col_tiles, 65535)));
    auto* bias = a.bias.ptr ? a.bias.data<const TO>() : nullptr;
    mixed_expand_kernel<TO><<<grid, kExpandThreads, 0, stream>>>(plan, out, a.out.ld, c, a.c.ld, bias, v, ldv,
                                                                 order, M, N);
    check_launch("mixed_expand_kernel");
  }
}

template <class T>
void launch_all(const MixedRowsArgs& a, const Plan& plan, const int* order, float* v, int64_t P,
                cudaStream_t stream) {
  const int64_t K = a.x.cols, N = a.out.cols;
  const int max_r = int(a.adapters->max_r);
  if (P > 0) {
    const Matrix& xm = a.xa.ptr ? a.xa : a.x;
    const int groups = (max_r + kJTile - 1) / kJTile;
    const bool vec = aligned16(xm) && K % 8 == 0;
    const unsigned grid = grid_for(P * groups, kWarpsPerBlock);
    float* h = a.h.ptr ? a.h.data<float>() : nullptr;
    auto* xa = xm.data<const T>();
    if (vec)
      mixed_shrink_kernel<T, true><<<grid, kWarpsPerBlock * 32, 0, stream>>>(plan, xa, xm.ld, order, v, max_r, h,
                                                                            a.h.ld, P, groups, max_r, K);
    else
      mixed_shrink_kernel<T, false><<<grid, kWarpsPerBlock * 32, 0, stream>>>(plan, xa, xm.ld, order, v, max_r, h,
                                                                             a.h.ld, P, groups, max_r, K);
    check_launch("mixed_shrink_kernel");
  }
  if (N == 0) return;
  if (a.out.dtype == DType::float32) return launch_out<T, float>(a, plan, order, v, max_r, stream);
  return launch_out<T, T>(a, plan, order, v, max_r, stream);
}

}  // namespace
}  // namespace lowrank::cuda

namespace lowrank {

void mixed_rows_cuda(const MixedRowsArgs& a, std::uintptr_t stream_handle) {
  using namespace lowrank::cuda;
  validate_mixed_rows(a, /*cuda=*/true);
  const MixedAdapters& t = *a.adapters;
  const int A = int(std::min<size_t>(t.items.size(), INT_MAX));
  LOWRANK_CHECK(A <= kMaxAdapters, "adapters: at most " + std::to_string(kMaxAdapters) +
                               " adapters per mixed batch on CUDA, got " + std::to_string(t.items.size()));
  const int64_t M = a.x.rows;
  LOWRANK_CHECK(M < INT_MAX, "x: too many rows for an int32 plan (" + std::to_string(M) + ")");
  LOWRANK_CHECK(t.max_r < INT_MAX / 64, "adapters: rank too large");
  // The caller (Python) runs this under the tensors' device and passes that device's current stream.
  cudaStream_t stream = as_stream(stream_handle);
  Scratch scratch(stream);

  // 1. The plan, checked on the device; one copy back of the flags and offsets.
  const int64_t nstat = int64_t(A) + 2;  // flags, offsets[0..A]
  int* status = scratch.alloc<int>(nstat + M);
  int* seen = status + nstat;
  check_cuda(cudaMemsetAsync(status, 0, size_t(nstat + M) * sizeof(int), stream), "cudaMemsetAsync");
  const int64_t n_check = std::max<int64_t>(M, int64_t(A) + 1);
  mixed_plan_check_kernel<<<grid_for(n_check, 256), 256, 0, stream>>>(a.order.data<const int>(),
                                                                      a.offsets.data<const int>(), int(M), A,
                                                                      n_check, status, seen);
  check_launch("mixed_plan_check_kernel");
  std::vector<int> host(size_t(nstat), 0);
  check_cuda(cudaMemcpyAsync(host.data(), status, size_t(nstat) * sizeof(int), cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  const int flags = host[0];
  // The CPU's wording (validate_mixed_plan_cpu), without the entry (the flags do not say which).
  const std::string in_m = std::to_string(M);
  LOWRANK_CHECK(!(flags & kBadRange), "order: an entry is outside [0, " + in_m + ")");
  LOWRANK_CHECK(!(flags & kDuplicate), "order: a row appears twice (expected a permutation)");
  LOWRANK_CHECK(!(flags & kBadFirst), "offsets: expected offsets[0] == 0, got " + std::to_string(host[1]));
  LOWRANK_CHECK(!(flags & (kDecreasing | kPastM)), "offsets: expected non-decreasing values in [0, " + in_m + "]");
  const int64_t P = host[1 + A];
  if (a.h.ptr)
    LOWRANK_CHECK(a.h.rows == P, "h: expected " + std::to_string(P) + " rows (offsets[-1]), got " + std::to_string(a.h.rows));
  if (M == 0) return;

  // 2. The kernels' table: checked offsets, expand tiles per segment, adapter descriptors.
  Plan plan{};
  plan.A = A;
  for (int s = 0; s <= A; ++s) plan.offsets[s] = host[1 + s];
  for (int s = 0; s <= A; ++s) {
    const int64_t len = (s < A ? plan.offsets[s + 1] : M) - plan.offsets[s];
    plan.tile_start[s + 1] = plan.tile_start[s] + int((len + kExpandP - 1) / kExpandP);
  }
  for (int i = 0; i < A; ++i) {
    const MixedAdapter& ad = t.items[size_t(i)];
    plan.ad[i] = AdapterDesc{reinterpret_cast<const void*>(ad.a.ptr), reinterpret_cast<const void*>(ad.e.ptr),
                             ad.v_scale.ptr ? ad.v_scale.data<const float>() : nullptr,
                             ad.col_scale.ptr ? ad.col_scale.data<const float>() : nullptr,
                             ad.a.ld, ad.e.ld, int(ad.a.rows), int(ad.a.dtype), int(ad.e.dtype),
                             aligned16(ad.a) ? 1 : 0, ad.scale};
  }
  float* v = P > 0 ? scratch.alloc<float>(P * t.max_r) : nullptr;

  // 3. Shrink, then the fused rows (w given) or the expand (w absent).
  switch (a.x.dtype) {
    case DType::float32: return launch_all<float>(a, plan, a.order.data<const int>(), v, P, stream);
    case DType::bfloat16: return launch_all<__nv_bfloat16>(a, plan, a.order.data<const int>(), v, P, stream);
    case DType::float16: return launch_all<__half>(a, plan, a.order.data<const int>(), v, P, stream);
    default: fail(std::string("x: unsupported dtype ") + dtype_name(a.x.dtype));
  }
}

}  // namespace lowrank
