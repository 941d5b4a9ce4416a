// Cross-entropy over the rows of a logits matrix: the loss of a causal language model, the step's
// last operation. csrc/cpu/cross_entropy.cpp and csrc/cuda/cross_entropy.cu implement it (the CPU
// entry points are in csrc/cpu/dispatch.cpp).
//
//   forward   lse[i]  = log Σ_j exp(logits[i, j])                       (fp32)
//             loss[i] = lse[i] - logits[i, labels[i]],  0 where labels[i] == ignore_index
//   backward  grad[i, j] = grad_loss[i] * (exp(logits[i, j] - lse[i]) - [j == labels[i]]),
//             0 in a row whose label is ignore_index; one rounding to logits' dtype
//
// Everything is computed in fp32 from the logits as they are (bf16 is widened exactly), as
// transformers' loss does after its `logits.float()`, without that fp32 copy, the log-softmax
// matrix it keeps for the backward, or the zero-filled gradient of its gather: the forward keeps
// only lse (one float per row) and the backward reads the logits once and writes the gradient once.
#pragma once
#include <string>

#include "common.h"

namespace lowrank {

struct CrossEntropyArgs {
  Matrix logits;  // [N, V] float32 / bfloat16 (+ float16 on CUDA)
  Matrix labels;  // [1, N] int64
  Matrix loss;    // [1, N] float32, out
  Matrix lse;     // [1, N] float32, out (0 in ignored rows)
  int64_t ignore_index = -100;
};

struct CrossEntropyBackwardArgs {
  Matrix grad;       // [N, V] logits' dtype, out; may be the logits themselves (in place)
  Matrix logits;     // [N, V]
  Matrix labels;     // [1, N] int64
  Matrix lse;        // [1, N] float32, from the forward
  Matrix grad_loss;  // [1, N] float32
  int64_t ignore_index = -100;
};

inline bool logits_dtype_ok(DType t, bool cuda) {
  return t == DType::float32 || t == DType::bfloat16 || (cuda && t == DType::float16);
}

inline void check_row_vector(const Matrix& m, const char* name, int64_t n, DType dtype) {
  check_matrix(m, name, 1, n);
  LOWRANK_CHECK(m.dtype == dtype, std::string(name) + ": expected " + dtype_name(dtype) + ", got " + dtype_name(m.dtype));
}

// Shapes, dtypes and devices; the labels' values are checked by the CPU launcher, which can read them.
inline void validate_cross_entropy(const CrossEntropyArgs& a, bool cuda) {
  const int64_t N = a.logits.rows, V = a.logits.cols;
  check_matrix(a.logits, "logits", N, V);
  LOWRANK_CHECK(logits_dtype_ok(a.logits.dtype, cuda), std::string("logits: unsupported dtype ") + dtype_name(a.logits.dtype));
  check_row_vector(a.labels, "labels", N, DType::int64);
  check_row_vector(a.loss, "loss", N, DType::float32);
  check_row_vector(a.lse, "lse", N, DType::float32);
  for (const Matrix* m : {&a.logits, &a.labels, &a.loss, &a.lse})
    LOWRANK_CHECK(cuda ? m->device == a.logits.device && m->device >= 0 : m->device == -1,
                  std::string("cross_entropy: every tensor must be on ") + (cuda ? "logits' CUDA device" : "the CPU"));
}

inline void validate_cross_entropy_backward(const CrossEntropyBackwardArgs& a, bool cuda) {
  const int64_t N = a.logits.rows, V = a.logits.cols;
  check_matrix(a.logits, "logits", N, V);
  LOWRANK_CHECK(logits_dtype_ok(a.logits.dtype, cuda), std::string("logits: unsupported dtype ") + dtype_name(a.logits.dtype));
  check_matrix(a.grad, "grad", N, V);
  LOWRANK_CHECK(a.grad.dtype == a.logits.dtype,
                std::string("grad: expected logits' dtype ") + dtype_name(a.logits.dtype) + ", got " + dtype_name(a.grad.dtype));
  check_row_vector(a.labels, "labels", N, DType::int64);
  check_row_vector(a.lse, "lse", N, DType::float32);
  check_row_vector(a.grad_loss, "grad_loss", N, DType::float32);
  for (const Matrix* m : {&a.grad, &a.logits, &a.labels, &a.lse, &a.grad_loss})
    LOWRANK_CHECK(cuda ? m->device == a.logits.device && m->device >= 0 : m->device == -1,
                  std::string("cross_entropy_backward: every tensor must be on ") +
                      (cuda ? "logits' CUDA device" : "the CPU"));
}

// Every label is ignore_index or a column of the logits (host memory only: the CPU launchers).
inline void check_labels_host(const Matrix& labels, int64_t V, int64_t ignore_index) {
  const int64_t* l = labels.data<int64_t>();
  for (int64_t i = 0; i < labels.cols; ++i)
    LOWRANK_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < V),
                  "labels: " + std::to_string(l[i]) + " at position " + std::to_string(i) + " is not a class in [0, " +
                      std::to_string(V) + ") nor ignore_index (" + std::to_string(ignore_index) + ")");
}

void cross_entropy_cpu(const CrossEntropyArgs& a, int num_threads);
void cross_entropy_backward_cpu(const CrossEntropyBackwardArgs& a, int num_threads);
void cross_entropy_cuda(const CrossEntropyArgs& a, std::uintptr_t stream);
void cross_entropy_backward_cuda(const CrossEntropyBackwardArgs& a, std::uintptr_t stream);

}  // namespace lowrank
