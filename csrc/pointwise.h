// Row-wise ops of a decoder layer around the adapters: RMSNorm and a gated MLP's SiLU product
// (csrc/cpu/pointwise.cpp; CPU entry points in csrc/cpu/dispatch.cpp).
//
// RMSNorm: The same function as transformers' LlamaRMSNorm (and the models that copy
// it), each output rounded where that module rounds it:
//
//   forward   r[m]    = 1 / sqrt(mean_j x[m, j]² + eps)                         (fp32, kept for the backward)
//             out[m, j] = round(w[j] · round(x[m, j] · r[m]))                    (round: to x's dtype)
//   backward  g[j] = dy[m, j] · w[j]   (fp32)
//             dx[m, j] = r · (g[j] − x[m, j] · r² · mean_i g[i] x[m, i]),  rounded once
//             dw[j]    = Σ_m dy[m, j] · round(x[m, j] · r[m]),             fp32 sums, rounded once
//
// SiLU product (a SwiGLU MLP's act(gate) * up), the same function as transformers' LlamaMLP computes
// between its projections, each output rounded where that module rounds it:
//
//   forward   out = round(round(silu(gate)) · up),   silu(g) = g / (1 + exp(−g))
//   backward  d_gate = round(dy · up · σ(g) · (1 + g · (1 − σ(g))))
//             d_up   = round(dy · round(silu(gate)))
//
// x and dy are read as they are (bf16 widened exactly); everything in between is fp32.
#pragma once
#include <string>
#include <utility>

#include "common.h"

namespace lowrank {

struct RMSNormArgs {
  Matrix out;     // [M, H] x's dtype
  Matrix x;       // [M, H] float32 / bfloat16
  Matrix weight;  // [1, H] x's dtype
  Matrix rstd;    // [1, M] float32, out
  float eps = 1e-6f;
};

struct RMSNormBackwardArgs {
  Matrix grad_x;       // [M, H] x's dtype, out
  Matrix grad_weight;  // [1, H] weight's dtype, out; or none (no ptr): not wanted
  Matrix grad_y;       // [M, H] x's dtype
  Matrix x;            // [M, H]
  Matrix weight;       // [1, H]
  Matrix rstd;         // [1, M] float32, from the forward
};

inline void check_same_dtype(const Matrix& m, const char* name, DType dtype) {
  LOWRANK_CHECK(m.dtype == dtype, std::string(name) + ": expected x's dtype " + dtype_name(dtype) + ", got " +
                                      dtype_name(m.dtype));
}

inline void validate_rms_norm_common(const Matrix& x, const Matrix& weight, const Matrix& rstd) {
  const int64_t M = x.rows, H = x.cols;
  check_matrix(x, "x", M, H);
  LOWRANK_CHECK(x.dtype == DType::float32 || x.dtype == DType::bfloat16,
                std::string("x: expected float32 or bfloat16, got ") + dtype_name(x.dtype));
  check_matrix(weight, "weight", 1, H);
  check_same_dtype(weight, "weight", x.dtype);
  check_matrix(rstd, "rstd", 1, M);
  LOWRANK_CHECK(rstd.dtype == DType::float32, std::string("rstd: expected float32, got ") + dtype_name(rstd.dtype));
}

inline void validate_rms_norm(const RMSNormArgs& a) {
  validate_rms_norm_common(a.x, a.weight, a.rstd);
  check_matrix(a.out, "out", a.x.rows, a.x.cols);
  check_same_dtype(a.out, "out", a.x.dtype);
  LOWRANK_CHECK(a.eps >= 0.0f, "eps: expected a number >= 0, got " + std::to_string(a.eps));
  for (const Matrix* m : {&a.out, &a.x, &a.weight, &a.rstd})
    LOWRANK_CHECK(m->device == -1, "rms_norm_cpu: every tensor must be on the CPU");
}

inline void validate_rms_norm_backward(const RMSNormBackwardArgs& a) {
  validate_rms_norm_common(a.x, a.weight, a.rstd);
  check_matrix(a.grad_y, "grad_y", a.x.rows, a.x.cols);
  check_same_dtype(a.grad_y, "grad_y", a.x.dtype);
  check_matrix(a.grad_x, "grad_x", a.x.rows, a.x.cols);
  check_same_dtype(a.grad_x, "grad_x", a.x.dtype);
  if (a.grad_weight.ptr) {
    check_matrix(a.grad_weight, "grad_weight", 1, a.x.cols);
    check_same_dtype(a.grad_weight, "grad_weight", a.x.dtype);
  }
  for (const Matrix* m : {&a.grad_x, &a.grad_weight, &a.grad_y, &a.x, &a.weight, &a.rstd})
    LOWRANK_CHECK(m->ptr == 0 || m->device == -1, "rms_norm_backward_cpu: every tensor must be on the CPU");
}

struct SiluMulArgs {
  Matrix out;   // [M, N] gate's dtype
  Matrix gate;  // [M, N] float32 / bfloat16
  Matrix up;    // [M, N] gate's dtype
};

struct SiluMulBackwardArgs {
  Matrix grad_gate;  // [M, N] gate's dtype, out
  Matrix grad_up;    // [M, N] gate's dtype, out
  Matrix grad_out;   // [M, N]
  Matrix gate;       // [M, N]
  Matrix up;         // [M, N]
};

inline void validate_silu_mul_operands(const Matrix& gate, const Matrix& up) {
  check_matrix(gate, "gate", gate.rows, gate.cols);
  LOWRANK_CHECK(gate.dtype == DType::float32 || gate.dtype == DType::bfloat16,
                std::string("gate: expected float32 or bfloat16, got ") + dtype_name(gate.dtype));
  LOWRANK_CHECK(up.dtype == gate.dtype, std::string("up: expected gate's dtype ") + dtype_name(gate.dtype) +
                                            ", got " + dtype_name(up.dtype));
  check_matrix(up, "up", gate.rows, gate.cols);
}

inline void validate_silu_mul(const SiluMulArgs& a) {
  validate_silu_mul_operands(a.gate, a.up);
  check_matrix(a.out, "out", a.gate.rows, a.gate.cols);
  LOWRANK_CHECK(a.out.dtype == a.gate.dtype, std::string("out: expected gate's dtype, got ") + dtype_name(a.out.dtype));
  for (const Matrix* m : {&a.out, &a.gate, &a.up})
    LOWRANK_CHECK(m->device == -1, "silu_mul_cpu: every tensor must be on the CPU");
}

inline void validate_silu_mul_backward(const SiluMulBackwardArgs& a) {
  validate_silu_mul_operands(a.gate, a.up);
  for (const auto& [m, name] : {std::pair{&a.grad_gate, "grad_gate"}, std::pair{&a.grad_up, "grad_up"},
                                std::pair{&a.grad_out, "grad_out"}}) {
    check_matrix(*m, name, a.gate.rows, a.gate.cols);
    LOWRANK_CHECK(m->dtype == a.gate.dtype, std::string(name) + ": expected gate's dtype, got " + dtype_name(m->dtype));
  }
  for (const Matrix* m : {&a.grad_gate, &a.grad_up, &a.grad_out, &a.gate, &a.up})
    LOWRANK_CHECK(m->device == -1, "silu_mul_backward_cpu: every tensor must be on the CPU");
}

void rms_norm_cpu(const RMSNormArgs& a, int num_threads);
void rms_norm_backward_cpu(const RMSNormBackwardArgs& a, int num_threads);
void silu_mul_cpu(const SiluMulArgs& a, int num_threads);
void silu_mul_backward_cpu(const SiluMulBackwardArgs& a, int num_threads);

}  // namespace lowrank
