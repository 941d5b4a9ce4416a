// NF4 (4-bit NormalFloat) with double-quantized scales: the format, shared by the CPU and CUDA
// kernels so both are the same math. Byte-compatible with bitsandbytes (DESIGN.md, "Numerics
// contracts"), so existing QLoRA checkpoints load and bitsandbytes can serve as a test oracle.
//
//   weight [rows, cols], flattened row-major; blocks of `blocksize` consecutive elements (the last
//   one may be partial, and blocks may straddle rows when cols % blocksize != 0).
//   codes   uint8, two elements per byte, the first (even flat index) in the HIGH nibble; when the
//           element count is odd the last low nibble is the code of 0.0 (7), as bitsandbytes pads.
//   absmax  per block: fp32, or (double quantization) uint8 codes into `code2` (256 entries) over
//           blocks of `blocksize2` (256) absmax values:
//               absmax[i] = code2[q[i]] * absmax2[i / blocksize2] + offset   (fp32 mul, then fp32 add)
//   value   = kTable[code] * absmax[block]   (fp32), rounded once to the output dtype.
//
// Quantization (bitsandbytes' exact arithmetic, so codes are byte-identical):
//   full block:    s = clamp(v * (1 / a), -1, 1);   partial last block: s = clamp(v / a, -1, 1),
//                  a = max(absmax, 1e-38); a full block stores absmax, the partial last block stores a
//                  (so an all-zero block's codes are 7, the exact 0.0, and decode to 0)
//   code          = number of table midpoints (fp32 (t[i] + t[i+1]) / 2) strictly below s
//                   (nearest code; a tie goes to the lower code)
//   nested codes: d = absmax - offset (fp32), absmax2 = max |d| over the block of 256,
//                 s = clamp(d * (1 / absmax2), -1, 1), bin = uint16((s + 1) * 0.5 * 65535 + 0.5) (each
//                 step rounded to fp32), code = number of code2 midpoints (c[j] + c[j+1]) / 2 strictly
//                 below the bin's centre -1 + 2 bin / 65535 (bitsandbytes' CPU quantizer: up to half a
//                 bin off the exact nearest code); absmax2 = 0 gives code 0.
#pragma once
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__)
#define LOWRANK_HD __host__ __device__ __forceinline__
#else
#define LOWRANK_HD inline
#endif

// The NF4 code book, index = code. A macro so host and device code can each instantiate an array.
#define LOWRANK_NF4_TABLE                                                                            \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,  \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,           \
   0.7229568362236023f, 1.0f}

namespace lowrank {

// A packed NF4 weight as the kernels read it. Pointers are raw addresses on `device`.
struct Nf4Weight {
  std::uintptr_t codes = 0;    // uint8 [ceil(rows*cols / 2)]
  int64_t rows = 0;            // out_features
  int64_t cols = 0;            // in_features
  int64_t blocksize = 64;
  // Either plain fp32 scales ...
  std::uintptr_t absmax = 0;   // float32 [nblocks], or 0 when double-quantized
  // ... or double-quantized ones.
  std::uintptr_t qabsmax = 0;  // uint8 [nblocks]
  std::uintptr_t code2 = 0;    // float32 [256]
  std::uintptr_t absmax2 = 0;  // float32 [ceil(nblocks / blocksize2)]
  std::uintptr_t offset = 0;   // float32 [1]
  int64_t blocksize2 = 256;
  int device = -1;

  LOWRANK_HD int64_t numel() const { return rows * cols; }
  LOWRANK_HD int64_t nblocks() const { return (numel() + blocksize - 1) / blocksize; }
  LOWRANK_HD bool nested() const { return qabsmax != 0; }
  LOWRANK_HD const uint8_t* codes_ptr() const { return reinterpret_cast<const uint8_t*>(codes); }
};

// absmax of block `b`, whose nested (double-quantization) block is `b2` = b / blocksize2 (callers
// walking blocks in order keep b2 as a counter), decoded exactly as bitsandbytes does: no fused
// multiply-add, the product is rounded to fp32 before the offset is added.
LOWRANK_HD float nf4_block_absmax(const Nf4Weight& w, int64_t b, int64_t b2) {
  if (!w.nested()) return reinterpret_cast<const float*>(w.absmax)[b];
  const float c = reinterpret_cast<const float*>(w.code2)[reinterpret_cast<const uint8_t*>(w.qabsmax)[b]];
  const float s = reinterpret_cast<const float*>(w.absmax2)[b2];
  const float off = *reinterpret_cast<const float*>(w.offset);
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(c, s), off);
#else
  return c * s + off;  // host sources calling this compile with -ffp-contract=off (CMakeLists.txt)
#endif
}

LOWRANK_HD float nf4_block_absmax(const Nf4Weight& w, int64_t b) {
  return nf4_block_absmax(w, b, w.nested() ? b / w.blocksize2 : 0);
}

inline void validate_nf4_weight(const Nf4Weight& w, const char* name) {
  const std::string n(name);
  LOWRANK_CHECK(w.rows >= 0 && w.cols >= 0, n + ": negative shape");
  LOWRANK_CHECK(extent_fits(w.rows, w.cols, w.cols), n + ": " + std::to_string(w.rows) + " x " + std::to_string(w.cols) +
                                                 " is more than 2^48 elements");
  LOWRANK_CHECK(w.blocksize >= 32 && w.blocksize <= 4096 && (w.blocksize & (w.blocksize - 1)) == 0,
        n + ": blocksize must be a power of two in [32, 4096], got " + std::to_string(w.blocksize));
  if (w.numel() == 0) return;
  LOWRANK_CHECK(w.codes != 0, n + ": null codes pointer");
  if (w.nested()) {
    LOWRANK_CHECK(w.code2 != 0 && w.absmax2 != 0 && w.offset != 0, n + ": double-quantized scales need code2, absmax2, offset");
    LOWRANK_CHECK(w.blocksize2 >= 1, n + ": blocksize2 must be positive");
    LOWRANK_CHECK(w.absmax == 0, n + ": give either absmax or qabsmax, not both");
  } else {
    LOWRANK_CHECK(w.absmax != 0, n + ": null absmax pointer");
  }
}

// ---- quantization ------------------------------------------------------------------------------
// codes[ceil(n/2)], absmax[ceil(n/blocksize)] from a contiguous fp32/bf16/fp16 vector of n values.
// Non-finite input raises (the CPU launcher checks as it goes; the CUDA one reports through a flag).
struct Nf4QuantizeArgs {
  std::uintptr_t input = 0;  // [n] contiguous
  DType dtype = DType::float32;
  int64_t n = 0;
  int64_t blocksize = 64;
  std::uintptr_t codes = 0;   // uint8 [ceil(n/2)]
  std::uintptr_t absmax = 0;  // float32 [ceil(n/blocksize)]
  std::uintptr_t status = 0;  // int32 [1] scratch (CUDA: non-finite flag); 0 on CPU
  int device = -1;
};

// Quantizes absmax - offset to 8 bits in blocks of blocksize2 with the 256-entry code2.
struct Nf4DoubleQuantArgs {
  std::uintptr_t absmax = 0;   // float32 [n]
  int64_t n = 0;
  std::uintptr_t offset = 0;   // float32 [1] (mean(absmax), computed by torch for bit-compatibility)
  std::uintptr_t code2 = 0;    // float32 [256], sorted ascending
  int64_t blocksize2 = 256;
  std::uintptr_t qabsmax = 0;  // uint8 [n]
  std::uintptr_t absmax2 = 0;  // float32 [ceil(n / blocksize2)]
  int device = -1;
};

// ---- fused rows: out = x · dequant(W)ᵀ + bias + scale · v eᵀ ---------------------------------
// The QLoRA forward for few tokens (v = u = A x in fp32, e = B), or the plain NF4 linear (v = 0).
struct Nf4RowsArgs {
  Matrix out;   // [M, N]  float32 or the compute dtype
  Matrix x;     // [M, K]  float32 or bfloat16 (CPU); compute dtype (CUDA)
  Nf4Weight w;  // [N, K]
  Matrix bias;  // [1, N]  float32 / compute dtype, or ptr == 0
  Matrix v;     // [M, R]  float32, or ptr == 0
  Matrix e;     // [N, R]  float32 / compute dtype
  float scale = 1.0f;
  bool bf16_dot = false;  // CPU: a bf16 x may use AVX512-BF16 products over W rounded once to bf16
};

// The operands of a rows product out[M, N] = x[M, K] · Wᵀ + bias + scale · v eᵀ, W on device `dev`
// (nf4_rows and the tiled layout's rows).
inline void validate_nf4_rows_operands(const Matrix& out, const Matrix& x, const Matrix& bias, const Matrix& v,
                                       const Matrix& e, int64_t N, int64_t K, bool cuda, int dev) {
  const int64_t M = x.rows;
  check_matrix(x, "x", M, K);
  check_matrix(out, "out", M, N);
  auto float_ok = [&](DType t) {
    return t == DType::float32 || t == DType::bfloat16 || (cuda && t == DType::float16);
  };
  LOWRANK_CHECK(cuda ? float_ok(x.dtype) : (x.dtype == DType::float32 || x.dtype == DType::bfloat16),
        std::string("x: unsupported dtype ") + dtype_name(x.dtype));
  LOWRANK_CHECK(out.dtype == DType::float32 || out.dtype == x.dtype || (!cuda && float_ok(out.dtype)),
        std::string("out: unsupported dtype ") + dtype_name(out.dtype));
  if (bias.ptr) {
    check_matrix(bias, "bias", 1, N);
    LOWRANK_CHECK(float_ok(bias.dtype), std::string("bias: unsupported dtype ") + dtype_name(bias.dtype));
  }
  LOWRANK_CHECK((v.ptr == 0) == (e.ptr == 0), "v and e: give both or neither");
  if (v.ptr) {
    const int64_t R = v.cols;
    check_matrix(v, "v", M, R);
    check_matrix(e, "e", N, R);
    LOWRANK_CHECK(v.dtype == DType::float32, std::string("v: expected float32, got ") + dtype_name(v.dtype));
    LOWRANK_CHECK(float_ok(e.dtype), std::string("e: unsupported dtype ") + dtype_name(e.dtype));
  }
  for (const Matrix* m : {&out, &x, &bias, &v, &e})
    LOWRANK_CHECK(m->ptr == 0 || m->device == dev, "all tensors must be on the weight's device");
}

inline void validate_nf4_rows(const Nf4RowsArgs& a, bool cuda) {
  validate_nf4_weight(a.w, "weight");
  LOWRANK_CHECK(cuda ? a.w.device >= 0 : a.w.device == -1, "weight: on the wrong device for this launcher");
  validate_nf4_rows_operands(a.out, a.x, a.bias, a.v, a.e, a.w.rows, a.w.cols, cuda, a.w.device);
}

// ---- dequantization ------------------------------------------------------------------------------
// out[i, :] = dequant(W)[row0 + i, :] for i < out.rows (a row tile, or the whole weight).
struct Nf4DequantizeArgs {
  Nf4Weight w;
  int64_t row0 = 0;
  Matrix out;        // [rows, cols] float32 / bfloat16 (+ float16 on CUDA): W[row0 + i, col0 + j]
  int64_t col0 = 0;  // CPU only: a column tile (cols = out.cols); CUDA decodes whole rows
};

inline void validate_nf4_dequantize(const Nf4DequantizeArgs& a, bool cuda) {
  validate_nf4_weight(a.w, "weight");
  LOWRANK_CHECK(a.row0 >= 0 && a.out.rows >= 0 && a.out.rows <= a.w.rows && a.row0 <= a.w.rows - a.out.rows,
        "row0: the row tile runs past the weight");
  LOWRANK_CHECK(a.col0 >= 0 && a.out.cols >= 0 && a.out.cols <= a.w.cols && a.col0 <= a.w.cols - a.out.cols,
        "col0: the column tile runs past the weight");
  LOWRANK_CHECK(!cuda || (a.col0 == 0 && a.out.cols == a.w.cols), "col0: column tiles are CPU-only");
  check_matrix(a.out, "out", a.out.rows, a.out.cols);
  LOWRANK_CHECK(a.out.dtype == DType::float32 || a.out.dtype == DType::bfloat16 || (cuda && a.out.dtype == DType::float16),
        std::string("out: unsupported dtype ") + dtype_name(a.out.dtype));
  LOWRANK_CHECK(cuda ? a.w.device >= 0 : a.w.device == -1, "weight: on the wrong device for this launcher");
  LOWRANK_CHECK(a.out.ptr == 0 || a.out.device == a.w.device, "out: must be on the weight's device");
}

inline void validate_nf4_quantize(const Nf4QuantizeArgs& a, bool cuda) {
  LOWRANK_CHECK(a.n >= 0, "weight: negative size");
  LOWRANK_CHECK(a.blocksize >= 32 && a.blocksize <= 4096 && (a.blocksize & (a.blocksize - 1)) == 0,
        "blocksize: must be a power of two in [32, 4096], got " + std::to_string(a.blocksize));
  LOWRANK_CHECK(a.dtype == DType::float32 || a.dtype == DType::bfloat16 || a.dtype == DType::float16,
        std::string("weight: unsupported dtype ") + dtype_name(a.dtype));
  LOWRANK_CHECK(a.n == 0 || (a.input && a.codes && a.absmax), "weight: null pointer");
  LOWRANK_CHECK(!cuda || a.n == 0 || a.status, "status: CUDA quantization needs a status word");
  LOWRANK_CHECK(cuda ? a.device >= 0 : a.device == -1, "weight: on the wrong device for this launcher");
}

inline void validate_nf4_double_quant(const Nf4DoubleQuantArgs& a, bool cuda) {
  LOWRANK_CHECK(a.n >= 0, "absmax: negative size");
  LOWRANK_CHECK(a.blocksize2 >= 1, "blocksize2: must be positive");
  LOWRANK_CHECK(a.n == 0 || (a.absmax && a.offset && a.code2 && a.qabsmax && a.absmax2), "absmax: null pointer");
  LOWRANK_CHECK(cuda ? a.device >= 0 : a.device == -1, "absmax: on the wrong device for this launcher");
}

// ---- input gradient for few tokens: out = dy · dequant(W) (fp32 sums; dy fp32 or bf16) ------------
// W is decoded in registers once per tile of dy rows (up to 12 with AVX-512, 10 for bf16 products, 4 with
// AVX2: cpu/nf4.cpp); each of the workspace's tasks accumulates the rows of W it was given into its own
// fp32 [M, K] slice, and the slices are summed at the end. CPU only,
// and only for in_features % 64 == 0 with blocksize >= 64 or 32 (nf4_input_grad_supported).
struct Nf4InputGradArgs {
  Matrix out;        // [M, K] float32
  Matrix dy;         // [M, N] float32 or bfloat16
  Nf4Weight w;       // [N, K]
  Matrix workspace;  // [tasks * M, K] float32; its row count picks the task count
  bool bf16_dot = true;  // a bf16 dy: AVX512-BF16 products over W rounded once to bf16 where the kernel
                         // variant has them, else dy widened against the exact fp32 W
};

inline bool nf4_input_grad_supported(const Nf4Weight& w) {
  return w.cols % 64 == 0 && (w.blocksize >= 64 || w.blocksize == 32);
}

inline void validate_nf4_input_grad(const Nf4InputGradArgs& a) {
  validate_nf4_weight(a.w, "weight");
  const int64_t M = a.dy.rows, N = a.w.rows, K = a.w.cols;
  LOWRANK_CHECK(nf4_input_grad_supported(a.w), "weight: the few-token input-gradient kernel needs in_features % 64 == 0");
  check_matrix(a.dy, "dy", M, N);
  check_matrix(a.out, "out", M, K);
  LOWRANK_CHECK(a.dy.dtype == DType::float32 || a.dy.dtype == DType::bfloat16, "dy: expected float32 or bfloat16");
  LOWRANK_CHECK(a.out.dtype == DType::float32 && a.workspace.dtype == DType::float32, "out, workspace: expected float32");
  LOWRANK_CHECK(M > 0 && a.workspace.rows >= M && a.workspace.rows % M == 0,
        "workspace: expected [tasks * M, K] rows");
  check_matrix(a.workspace, "workspace", a.workspace.rows, K);
  LOWRANK_CHECK(a.w.device == -1 && a.out.device == -1 && a.dy.device == -1 && a.workspace.device == -1,
        "all tensors must be on the CPU");
}

void nf4_input_grad_cpu(const Nf4InputGradArgs& a, int num_threads);

// ---- the inference layout (CPU, AVX-512): tiles of 16 rows -------------------------------------------
// A copy of the codes re-laid so that one 512-bit lane is one output row: 16 rows x 8 columns per 64
// bytes, and each row's block scales decoded once to fp32, transposed to match. The few-token kernel
// then broadcasts x and accumulates 16 rows per register with no horizontal sums (cpu/nf4_tiled.cpp).
// Needs cols % blocksize == 0 (rows made of whole blocks; blocksize >= 32 makes cols % 8 == 0 too).
//   codes   uint8 [tiles][cols / 8][64]: byte 4j + q of tile t, chunk c holds in its low nibble the
//           code of (row 16t + j/2, column 8c + 2q + j%2) and in its high nibble that of row 16t + 8 + j/2
//           (same column); rows past the weight's end hold code 7 (0.0)
//   scales  float32 [tiles][cols / blocksize][16]: absmax of (row 16t + l, block b of that row), 0 past
//           the end
struct Nf4Tiled {
  std::uintptr_t codes = 0;
  std::uintptr_t scales = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t blocksize = 64;
  int64_t tiles() const { return (rows + 15) / 16; }
  int64_t code_bytes() const { return tiles() * cols * 8; }
  int64_t scale_count() const { return blocksize > 0 ? tiles() * (cols / blocksize) * 16 : 0; }
};

inline bool nf4_tileable(const Nf4Weight& w) {
  return w.rows > 0 && w.cols > 0 && w.blocksize >= 32 && w.cols % w.blocksize == 0;
}

// out[M, N] = x[M, K] · dequant(W)ᵀ + bias + scale · v eᵀ over the tiled copy. x float32 (exact W,
// fp32 products) or bfloat16 (W rounded once to bf16, AVX512-BF16 products); fp32 accumulation, one
// rounding per output, as nf4_rows.
struct Nf4TiledRowsArgs {
  Matrix out;
  Matrix x;
  Nf4Tiled w;
  Matrix bias;
  Matrix v;
  Matrix e;
  float scale = 1.0f;
};

inline void validate_nf4_tiled(const Nf4Tiled& p, const char* name) {
  const std::string n(name);
  LOWRANK_CHECK(p.rows > 0 && p.cols > 0 && extent_fits(p.rows, p.cols, p.cols), n + ": bad shape");
  LOWRANK_CHECK(p.blocksize >= 32 && p.blocksize <= 4096 && (p.blocksize & (p.blocksize - 1)) == 0 &&
                    p.cols % p.blocksize == 0,
                n + ": blocksize must be a power of two in [32, 4096] dividing in_features");
  LOWRANK_CHECK(p.codes != 0 && p.scales != 0, n + ": null pointer");
}

inline void validate_nf4_tiled_rows(const Nf4TiledRowsArgs& a) {
  validate_nf4_tiled(a.w, "tiled");
  validate_nf4_rows_operands(a.out, a.x, a.bias, a.v, a.e, a.w.rows, a.w.cols, /*cuda=*/false, /*dev=*/-1);
}

// Whether the CPU kernel variant in use has the tiled kernels (AVX-512; bf16 x also needs AVX512-BF16).
bool nf4_tiled_available(DType x_dtype);
// Fills `tiled` (its buffers allocated by the caller: code_bytes() and scale_count()) from `w`.
void nf4_tile_cpu(const Nf4Weight& w, const Nf4Tiled& tiled, int num_threads);
void nf4_rows_tiled_cpu(const Nf4TiledRowsArgs& a, int num_threads);

// Launchers. CPU: num_threads as torch.get_num_threads(). CUDA: a raw cudaStream_t.
void nf4_quantize_cpu(const Nf4QuantizeArgs& a, int num_threads);
void nf4_double_quant_cpu(const Nf4DoubleQuantArgs& a, int num_threads);
void nf4_dequantize_cpu(const Nf4DequantizeArgs& a, int num_threads);
void nf4_rows_cpu(const Nf4RowsArgs& a, int num_threads);

#ifdef LOWRANK_WITH_CUDA
// The quantize launcher writes 1 to *status (device memory) if it met a non-finite value; the
// caller reads it back (one sync, at quantization time only).
void nf4_quantize_cuda(const Nf4QuantizeArgs& a, std::uintptr_t stream);
void nf4_double_quant_cuda(const Nf4DoubleQuantArgs& a, std::uintptr_t stream);
void nf4_dequantize_cuda(const Nf4DequantizeArgs& a, std::uintptr_t stream);
void nf4_rows_cuda(const Nf4RowsArgs& a, std::uintptr_t stream);
#endif

}  // namespace lowrank
