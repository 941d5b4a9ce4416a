// Cross-entropy over logits rows on the CPU (csrc/loss.h has the math). One row at a time, rows
// shared among threads: the forward reads a row twice (its max, then Σ exp(x − max): the second pass
// finds the row in L2, a 49152-word bf16 row is 96 KB), the backward reads it once and writes the
// gradient once. exp is simd.h's vexp, the same algorithm in every variant; a row's last partial
// vector is padded with −inf (exp gives 0, max ignores it), so it takes the same path as the others.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/parallel_for.h"
#include "cpu/simd.h"
#include "loss.h"

namespace lowrank::cpu::LOWRANK_ISA {
namespace {

constexpr int W = Vec::width;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kTaskElements = 32768;  // rows per parallel task: at least this many logits

// The n < W elements at p as one vector, padded with −inf.
template <class T>
inline Vec load_tail(const T* p, int64_t n) { return vload_n(p, n, kNegInf); }

// max of the row, and log Σ exp(x − max). A NaN anywhere makes the sum NaN (exp(NaN − m) is NaN,
// whatever m came to be), so the loss is NaN as torch's is.
template <class T>
inline void row_logsumexp(const T* x, int64_t V, float* max_out, float* log_sum_out) {
  Vec m0 = vset1(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * W <= V; j += 4 * W) {
    m0 = vmax(m0, vload(x + j));
    m1 = vmax(m1, vload(x + j + W));
    m2 = vmax(m2, vload(x + j + 2 * W));
    m3 = vmax(m3, vload(x + j + 3 * W));
  }
  for (; j + W <= V; j += W) m0 = vmax(m0, vload(x + j));
  if (j < V) m1 = vmax(m1, load_tail(x + j, V - j));
  const float m = vhmax(vmax(vmax(m0, m1), vmax(m2, m3)));
  const Vec vm = vset1(m);
  Vec s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
  j = 0;
  for (; j + 4 * W <= V; j += 4 * W) {
    s0 = vadd(s0, vexp(vsub(vload(x + j), vm)));
    s1 = vadd(s1, vexp(vsub(vload(x + j + W), vm)));
    s2 = vadd(s2, vexp(vsub(vload(x + j + 2 * W), vm)));
    s3 = vadd(s3, vexp(vsub(vload(x + j + 3 * W), vm)));
  }
  for (; j + W <= V; j += W) s0 = vadd(s0, vexp(vsub(vload(x + j), vm)));
  if (j < V) s1 = vadd(s1, vexp(vsub(load_tail(x + j, V - j), vm)));
  *max_out = m;
  *log_sum_out = std::log(vsum(vadd(vadd(s0, s1), vadd(s2, s3))));
}

inline int64_t rows_per_task(int64_t V) { return V >= kTaskElements ? 1 : kTaskElements / (V > 0 ? V : 1); }

template <class T>
struct ForwardJob {
  const CrossEntropyArgs* a;
  int64_t rows_per_task;

  static void run(void* ctx, int64_t task) {
    const auto& job = *static_cast<const ForwardJob*>(ctx);
    const CrossEntropyArgs& a = *job.a;
    const int64_t N = a.logits.rows, V = a.logits.cols;
    const int64_t* labels = a.labels.data<int64_t>();
    float* loss = a.loss.data<float>();
    float* lse = a.lse.data<float>();
    const int64_t end = std::min(N, (task + 1) * job.rows_per_task);
    for (int64_t i = task * job.rows_per_task; i < end; ++i) {
      if (labels[i] == a.ignore_index) {
        loss[i] = 0.0f;
        lse[i] = 0.0f;
        continue;
      }
      const T* x = a.logits.data<T>() + i * a.logits.ld;
      float m, log_sum;
      row_logsumexp(x, V, &m, &log_sum);
      lse[i] = m + log_sum;
      loss[i] = (m - load_scalar(x + labels[i])) + log_sum;  // exact difference first when they are close
    }
  }
};

template <class T>
struct BackwardJob {
  const CrossEntropyBackwardArgs* a;
  int64_t rows_per_task;

  static void run(void* ctx, int64_t task) {
    const auto& job = *static_cast<const BackwardJob*>(ctx);
    const CrossEntropyBackwardArgs& a = *job.a;
    const int64_t N = a.logits.rows, V = a.logits.cols;
    const int64_t* labels = a.labels.data<int64_t>();
    const int64_t end = std::min(N, (task + 1) * job.rows_per_task);
    for (int64_t i = task * job.rows_per_task; i < end; ++i) {
      T* g = a.grad.data<T>() + i * a.grad.ld;
      if (labels[i] == a.ignore_index) {
        std::memset(static_cast<void*>(g), 0, size_t(V) * sizeof(T));  // +0 in fp32 and bf16 alike
        continue;
      }
      const T* x = a.logits.data<T>() + i * a.logits.ld;
      const float l = a.lse.data<float>()[i], s = a.grad_loss.data<float>()[i];
      const int64_t c = labels[i];
      const float label_grad = (exp1(load_scalar(x + c) - l) - 1.0f) * s;  // softmax − one-hot, (p − 1)·s exactly;
      // read before the row is written: grad may be the logits' own memory (each element is read, then written)
      const Vec vl = vset1(l), vs = vset1(s);
      int64_t j = 0;
      for (; j + 2 * W <= V; j += 2 * W) {
        vstore(g + j, vmul(vexp(vsub(vload(x + j), vl)), vs));
        vstore(g + j + W, vmul(vexp(vsub(vload(x + j + W), vl)), vs));
      }
      for (; j + W <= V; j += W) vstore(g + j, vmul(vexp(vsub(vload(x + j), vl)), vs));
      if (j < V) vstore_n(g + j, vmul(vexp(vsub(load_tail(x + j, V - j), vl)), vs), V - j);
      store_scalar(g + c, label_grad);
    }
  }
};

}  // namespace

void cross_entropy(const CrossEntropyArgs& a, int num_threads) {
  const int64_t N = a.logits.rows, rpt = rows_per_task(a.logits.cols);
  const int64_t tasks = (N + rpt - 1) / rpt;
  if (a.logits.dtype == DType::bfloat16) {
    ForwardJob<bf16_t> job{&a, rpt};
    parallel_for(tasks, num_threads, &ForwardJob<bf16_t>::run, &job);
  } else {
    ForwardJob<float> job{&a, rpt};
    parallel_for(tasks, num_threads, &ForwardJob<float>::run, &job);
  }
}

void cross_entropy_backward(const CrossEntropyBackwardArgs& a, int num_threads) {
  const int64_t N = a.logits.rows, rpt = rows_per_task(a.logits.cols);
  const int64_t tasks = (N + rpt - 1) / rpt;
  if (a.logits.dtype == DType::bfloat16) {
    BackwardJob<bf16_t> job{&a, rpt};
    parallel_for(tasks, num_threads, &BackwardJob<bf16_t>::run, &job);
  } else {
    BackwardJob<float> job{&a, rpt};
    parallel_for(tasks, num_threads, &BackwardJob<float>::run, &job);
  }
}

}  // namespace lowrank::cpu::LOWRANK_ISA
