// Fused LoRA row kernels: the launchers that csrc/cpu/lora.cpp and csrc/cuda/lora.cu implement (their
// CPU entry points, lora_fused_cpu included, are in csrc/cpu/dispatch.cpp).
//
//   out[m, n] = sum_k x[m, k] * w[n, k]  +  scale * c[n] * sum_j v[m, j] * s[j] * e[n, j]  +  bias[n]
//
// With w = W (base weight), v = u = A x (fp32), e = B and no c it is the LoRA forward
// y = xWᵀ + s·(xAᵀ)Bᵀ + b, streaming W once; with w = A and no v/e/bias it is the down projection
// u = x Aᵀ in fp32. With v = h = A_s x, s = d (v_scale), e = B_s and c = b (col_scale) it is the VeRA forward
// y = xWᵀ + b ⊙ (B_s (d ⊙ A_s x)) + bias; A_s = A[:r, :in] and B_s = B[:out, :r] are read in place
// through their leading dimensions. Accumulation is fp32; the result is rounded once to out's dtype.
#pragma once
#include "common.h"

namespace lowrank {

struct LoraRowsArgs {
  Matrix out;   // [M, N]  float32 or w's dtype
  Matrix x;     // [M, K]  float32 or bfloat16 (CPU); w's dtype (CUDA)
  Matrix w;     // [N, K]  float32 / bfloat16 (CPU), + float16 (CUDA)
  Matrix bias;  // [1, N]  w's dtype, or ptr == 0 for none
  Matrix v;     // [M, R]  float32, or ptr == 0 for no adapter term
  Matrix e;     // [N, R]  float32 or w's dtype
  Matrix col_scale;  // [1, N]  float32: c, a per-output-column factor on the adapter term, or ptr == 0
  Matrix v_scale;    // [1, R]  float32: s, a per-rank factor on v in the adapter term, or ptr == 0
  float scale = 1.0f;
};

// Validates shapes and dtypes; throws std::invalid_argument naming the argument.
inline void validate_lora_rows(const LoraRowsArgs& a, bool cuda) {
  const int64_t M = a.x.rows, K = a.x.cols, N = a.w.rows;
  check_matrix(a.w, "w", N, K);
  check_matrix(a.out, "out", M, N);
  check_matrix(a.x, "x", M, K);
  const bool w_ok = a.w.dtype == DType::float32 || a.w.dtype == DType::bfloat16 ||
                    (cuda && a.w.dtype == DType::float16);
  LOWRANK_CHECK(w_ok, std::string("w: unsupported dtype ") + dtype_name(a.w.dtype));
  LOWRANK_CHECK(cuda ? a.x.dtype == a.w.dtype : (a.x.dtype == DType::float32 || a.x.dtype == DType::bfloat16),
        std::string("x: expected ") + (cuda ? "w's dtype" : "float32 or bfloat16") + ", got " + dtype_name(a.x.dtype));
  LOWRANK_CHECK(a.out.dtype == DType::float32 || a.out.dtype == a.w.dtype,
        std::string("out: expected float32 or w's dtype, got ") + dtype_name(a.out.dtype));
  if (a.bias.ptr) {
    check_matrix(a.bias, "bias", 1, N);
    LOWRANK_CHECK(a.bias.dtype == a.w.dtype, std::string("bias: expected w's dtype, got ") + dtype_name(a.bias.dtype));
  }
  LOWRANK_CHECK((a.v.ptr == 0) == (a.e.ptr == 0), "v and e: give both or neither");
  if (a.v.ptr) {
    const int64_t R = a.v.cols;
    check_matrix(a.v, "v", M, R);
    check_matrix(a.e, "e", N, R);
    LOWRANK_CHECK(a.v.dtype == DType::float32, std::string("v: expected float32, got ") + dtype_name(a.v.dtype));
    LOWRANK_CHECK(a.e.dtype == DType::float32 || a.e.dtype == a.w.dtype,
          std::string("e: expected float32 or w's dtype, got ") + dtype_name(a.e.dtype));
  }
  if (a.col_scale.ptr) {
    LOWRANK_CHECK(a.v.ptr != 0, "col_scale: scales the adapter term, so v and e are needed too");
    check_matrix(a.col_scale, "col_scale", 1, N);
    LOWRANK_CHECK(a.col_scale.dtype == DType::float32,
          std::string("col_scale: expected float32, got ") + dtype_name(a.col_scale.dtype));
  }
  if (a.v_scale.ptr) {
    LOWRANK_CHECK(a.v.ptr != 0, "v_scale: scales v in the adapter term, so v and e are needed too");
    check_matrix(a.v_scale, "v_scale", 1, a.v.cols);
    LOWRANK_CHECK(a.v_scale.dtype == DType::float32,
          std::string("v_scale: expected float32, got ") + dtype_name(a.v_scale.dtype));
  }
  const int dev = a.w.device;
  LOWRANK_CHECK(cuda ? dev >= 0 : dev == -1, std::string("w: on the wrong device for this launcher"));
  for (const Matrix* m : {&a.out, &a.x, &a.bias, &a.v, &a.e, &a.col_scale, &a.v_scale})
    LOWRANK_CHECK(m->ptr == 0 || m->device == dev, "all tensors must be on w's device");
}

void lora_rows_cpu(const LoraRowsArgs& a, int num_threads);

// The whole fused LoRA forward in one call: u = x aᵀ ([M, R] fp32, with the rows kernel over a's R
// rows), then lora_rows with v = u. `a` ([R, K]) is float32 or w's dtype; `u` is where u goes (float32
// [M, R], for the backward), or ptr == 0 for a scratch buffer. `args.v` must be empty (it is u) and
// `args.e` is B ([N, R]); with R = 0 there is no adapter term and e is not read.
void lora_fused_cpu(const LoraRowsArgs& args, const Matrix& a, const Matrix& u, int num_threads);

// The CPU few-token kernels (LoRA and NF4 rows, input gradients, adapter products) give a call fewer
// threads than asked when it has less than this many multiply-adds per thread (0: never fewer).
void set_parallel_min_work(int64_t work);
int64_t parallel_min_work();

// The input gradient of the LoRA linear, streaming W once (few-token backward):
//
//   out[m, k] = sum_n dy[m, n] * w[n, k]  +  sum_j g[m, j] * a[j, k]
//
// with g = s·dy B (fp32, [M, R]) and a = A ([R, K]). The rows of w and a are split over tasks;
// each task accumulates into its own fp32 slice of `workspace`, and the slices are summed at the end.
struct LoraInputGradArgs {
  Matrix out;        // [M, K]  float32 or w's dtype
  Matrix dy;         // [M, N]  float32, or bfloat16 (AVX512-BF16 products against a bf16 w; else widened)
  Matrix w;          // [N, K]  float32 / bfloat16
  Matrix g;          // [M, R]  float32, or ptr == 0 for no adapter term
  Matrix a;          // [R, K]  float32 or w's dtype
  Matrix workspace;  // [tasks * M, K] float32, tasks >= 1; its row count picks the task count
  bool bf16_dot = true;  // a bf16 dy: AVX512-BF16 products where the CPU has them (else widened), or widened
};

inline void validate_lora_input_grad(const LoraInputGradArgs& p) {
  const int64_t M = p.dy.rows, N = p.w.rows, K = p.w.cols;
  check_matrix(p.dy, "dy", M, N);
  check_matrix(p.out, "out", M, K);
  LOWRANK_CHECK(p.w.dtype == DType::float32 || p.w.dtype == DType::bfloat16,
        std::string("w: unsupported dtype ") + dtype_name(p.w.dtype));
  LOWRANK_CHECK(p.dy.dtype == DType::float32 || p.dy.dtype == DType::bfloat16,
        std::string("dy: expected float32 or bfloat16, got ") + dtype_name(p.dy.dtype));
  LOWRANK_CHECK(p.out.dtype == DType::float32 || p.out.dtype == p.w.dtype,
        std::string("out: expected float32 or w's dtype, got ") + dtype_name(p.out.dtype));
  LOWRANK_CHECK((p.g.ptr == 0) == (p.a.ptr == 0), "g and a: give both or neither");
  if (p.g.ptr) {
    check_matrix(p.g, "g", M, p.g.cols);
    check_matrix(p.a, "a", p.g.cols, K);
    LOWRANK_CHECK(p.g.dtype == DType::float32, std::string("g: expected float32, got ") + dtype_name(p.g.dtype));
    LOWRANK_CHECK(p.a.dtype == DType::float32 || p.a.dtype == p.w.dtype,
          std::string("a: expected float32 or w's dtype, got ") + dtype_name(p.a.dtype));
  }
  LOWRANK_CHECK(p.workspace.dtype == DType::float32 && p.workspace.cols == K && M > 0 &&
            p.workspace.rows >= M && p.workspace.rows % M == 0 && p.workspace.ld == K,
        "workspace: expected a contiguous float32 [tasks * M, K] buffer");
  for (const Matrix* m : {&p.out, &p.dy, &p.w, &p.g, &p.a, &p.workspace})
    LOWRANK_CHECK(m->ptr == 0 || m->device == -1, "lora_input_grad_cpu: every tensor must be on the CPU");
}

void lora_input_grad_cpu(const LoraInputGradArgs& a, int num_threads);

// The adapter's side of training (csrc/cpu/adapter_products.cpp): two skinny products from one pass
// over x, read in its own dtype,
//
//   c = scale * x y      [M, R]    (y: [K, R], or [R, K] with y_transposed)
//   d = scale * xᵀ u     [K, R]    (written as [R, K] with d_transposed)
//
// either or both (y and c together, u and d together). fp32 accumulation, one rounding to c's / d's dtype.
struct AdapterProductsArgs {
  Matrix x;  // [M, K]  float32 / bfloat16
  Matrix y;  // [K, R] or [R, K]  float32 / bfloat16, or ptr == 0 for no c
  Matrix u;  // [M, R]  float32 / bfloat16, or ptr == 0 for no d
  Matrix c;  // [M, R]  float32 / bfloat16
  Matrix d;  // [K, R] or [R, K]  float32 / bfloat16
  bool y_transposed = false;
  bool d_transposed = false;
  float scale = 1.0f;
};

inline void validate_adapter_products(const AdapterProductsArgs& p) {
  const int64_t M = p.x.rows, K = p.x.cols;
  auto float_or_bf16 = [](const Matrix& m) { return m.dtype == DType::float32 || m.dtype == DType::bfloat16; };
  check_matrix(p.x, "x", M, K);
  LOWRANK_CHECK(float_or_bf16(p.x), std::string("x: expected float32 or bfloat16, got ") + dtype_name(p.x.dtype));
  LOWRANK_CHECK((p.y.ptr == 0) == (p.c.ptr == 0), "y and c: give both or neither");
  LOWRANK_CHECK((p.u.ptr == 0) == (p.d.ptr == 0), "u and d: give both or neither");
  LOWRANK_CHECK(p.y.ptr || p.u.ptr, "adapter_products: nothing to compute (give y and c, u and d, or both)");
  const int64_t R = p.y.ptr ? (p.y_transposed ? p.y.rows : p.y.cols) : p.u.cols;
  LOWRANK_CHECK(R > 0, "y / u: expected at least one column (rank 0 has no adapter products)");
  if (p.y.ptr) {
    if (p.y_transposed)
      check_matrix(p.y, "y", R, K);
    else
      check_matrix(p.y, "y", K, R);
    check_matrix(p.c, "c", M, R);
    LOWRANK_CHECK(float_or_bf16(p.y), std::string("y: expected float32 or bfloat16, got ") + dtype_name(p.y.dtype));
    LOWRANK_CHECK(float_or_bf16(p.c), std::string("c: expected float32 or bfloat16, got ") + dtype_name(p.c.dtype));
  }
  if (p.u.ptr) {
    check_matrix(p.u, "u", M, R);
    if (p.d_transposed)
      check_matrix(p.d, "d", R, K);
    else
      check_matrix(p.d, "d", K, R);
    LOWRANK_CHECK(float_or_bf16(p.u), std::string("u: expected float32 or bfloat16, got ") + dtype_name(p.u.dtype));
    LOWRANK_CHECK(float_or_bf16(p.d), std::string("d: expected float32 or bfloat16, got ") + dtype_name(p.d.dtype));
  }
  // The kernel's scratch holds (y, u, c and every task's partial d) in fp32: bounded like any view.
  LOWRANK_CHECK(extent_fits(M + K, R + 16, R + 16), "x: too large for the adapter products' scratch");
  for (const Matrix* m : {&p.x, &p.y, &p.u, &p.c, &p.d})
    LOWRANK_CHECK(m->ptr == 0 || m->device == -1, "adapter_products_cpu: every tensor must be on the CPU");
}

void adapter_products_cpu(const AdapterProductsArgs& a, int num_threads);

// The adapter's term of a many-token product (csrc/cpu/adapter_products.cpp), for the GEMM paths:
//
//   out[m, n] = bias[n] + scale * sum_j u[m, j] * e[n, j]
//
// fp32 products and sums, one rounding to out's dtype. Forward: u = x Aᵀ, e = B, then the base GEMM
// accumulates onto out; input gradient: u = g, e = A read transposed ([R, K]). Used by the bf16
// paths; in fp32, torch's GEMM computes the same sum as fast or faster.
struct AdapterTermArgs {
  Matrix out;    // [M, N]  float32 / bfloat16
  Matrix u;      // [M, R]  float32
  Matrix e;      // [N, R] float32 / bfloat16, or [R, N] with e_transposed
  Matrix bias;   // [1, N]  float32 / bfloat16, or ptr == 0
  float scale = 1.0f;
  bool e_transposed = false;
  Matrix col_scale;  // [1, N] float32 (out = bias + scale · col_scale ⊙ u eᵀ), or ptr == 0
};

inline void validate_adapter_term(const AdapterTermArgs& p) {
  const int64_t M = p.out.rows, N = p.out.cols, R = p.u.cols;
  auto float_or_bf16 = [](const Matrix& m) { return m.dtype == DType::float32 || m.dtype == DType::bfloat16; };
  check_matrix(p.out, "out", M, N);
  LOWRANK_CHECK(float_or_bf16(p.out), std::string("out: expected float32 or bfloat16, got ") + dtype_name(p.out.dtype));
  check_matrix(p.u, "u", M, R);
  LOWRANK_CHECK(p.u.dtype == DType::float32, std::string("u: expected float32, got ") + dtype_name(p.u.dtype));
  if (p.e_transposed)
    check_matrix(p.e, "e", R, N);
  else
    check_matrix(p.e, "e", N, R);
  LOWRANK_CHECK(float_or_bf16(p.e), std::string("e: expected float32 or bfloat16, got ") + dtype_name(p.e.dtype));
  if (p.bias.ptr) {
    check_matrix(p.bias, "bias", 1, N);
    LOWRANK_CHECK(float_or_bf16(p.bias), std::string("bias: expected float32 or bfloat16, got ") + dtype_name(p.bias.dtype));
  }
  if (p.col_scale.ptr) {
    check_matrix(p.col_scale, "col_scale", 1, N);
    LOWRANK_CHECK(p.col_scale.dtype == DType::float32,
                  std::string("col_scale: expected float32, got ") + dtype_name(p.col_scale.dtype));
  }
  LOWRANK_CHECK(extent_fits(R, N + 32, N + 32), "e: too large for the adapter term's scratch");
  for (const Matrix* m : {&p.out, &p.u, &p.e, &p.bias, &p.col_scale})
    LOWRANK_CHECK(m->ptr == 0 || m->device == -1, "adapter_term_cpu: every tensor must be on the CPU");
}

void adapter_term_cpu(const AdapterTermArgs& a, int num_threads);

// The whole LoRA backward for few tokens in one call (the eager training step of a small layer, where
// per-call costs decide): g = s·dy B and grad_B = s·dyᵀ u, grad_A = gᵀ x_a (adapter_products), then
// dx = dy W + g A (lora_input_grad, whose `bf16_dot` this passes on). Each step's own checks all run
// before anything is written.
struct LoraBackwardArgs {
  Matrix dx;      // [M, K]  float32 or w's dtype
  Matrix grad_a;  // [R, K]  float32 / bfloat16
  Matrix grad_b;  // [N, R]  float32 / bfloat16
  Matrix g;       // [M, R]  float32
  Matrix dy;      // [M, N]  float32 / bfloat16
  Matrix xa;      // [M, K]  dy's dtype
  Matrix u;       // [M, R]  float32
  Matrix w;       // [N, K]  float32 / bfloat16
  Matrix a;       // [R, K]  float32 or w's dtype
  Matrix b;       // [N, R]  float32 / bfloat16
  float scale = 1.0f;
  bool bf16_dot = false;  // LoraInputGradArgs::bf16_dot for dx (the measured choice)
};

void lora_backward_cpu(const LoraBackwardArgs& a, int num_threads);

#ifdef LOWRANK_WITH_CUDA
void lora_rows_cuda(const LoraRowsArgs& a, std::uintptr_t stream);
#endif

}  // namespace lowrank
