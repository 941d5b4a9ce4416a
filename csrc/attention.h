// Causal self-attention on the CPU (csrc/cpu/attention.cpp), forward and backward, for the decoder
// layers around the adapters: grouped-query (H query heads share KV key/value heads, H % KV == 0),
// key j visible to query i when j <= i + (S - T) (the bottom-right causal mask: T == S in training and
// prefill, T == 1 in decode, which then sees every key) and, given per-batch key ranges, start_b <= j <
// end_b (a padded batch). fp32 products and sums, each output rounded once to the inputs' dtype (fp32
// or bf16); the forward also returns each row's log-sum-exp (fp32), from which the backward rebuilds
// the probabilities instead of keeping them.
#pragma once
#include <string>

#include "common.h"

namespace lowrank {

// A 4-D strided view, element (a, b, c, d) at ptr + (a*s0 + b*s1 + c*s2 + d)*itemsize: the last
// dimension (the head dimension) contiguous, the others any stride (HF's query is a transposed view).
struct Strided4 {
  std::uintptr_t ptr = 0;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  DType dtype = DType::float32;
};

struct AttentionArgs {
  Strided4 q;    // [B, H, T, D]
  Strided4 k;    // [B, KV, S, D]
  Strided4 v;    // [B, KV, S, D]
  Strided4 out;  // [B, H, T, D]  q's dtype (forward only: the backward does not read it)
  std::uintptr_t lse = 0;  // [B, H, T] float32, contiguous
  int64_t B = 0, H = 0, KV = 0, T = 0, S = 0, D = 0;
  float scale = 1.0f;
  // [B, 2] int64, or 0: batch b's queries see only keys j in [kv_range[b][0], kv_range[b][1]) (a padded
  // batch's mask: right padding ends the range early, left padding starts it late), 0 <= start <= end <= S.
  // A query row that sees no key (a left pad's) gets zeros and lse = −inf, as torch's SDPA gives it.
  std::uintptr_t kv_range = 0;
};

struct AttentionBackwardArgs {
  AttentionArgs fwd;  // q, k, v and lse as the forward left them (no out: see attention.cpp)
  Strided4 dout;      // [B, H, T, D]
  Strided4 dq;        // [B, H, T, D]
  Strided4 dk;        // [B, KV, S, D]
  Strided4 dv;        // [B, KV, S, D]
};

constexpr int64_t kAttentionMaxHeadDim = 256;

inline void validate_attention(const AttentionArgs& a, bool forward = true) {
  LOWRANK_CHECK(a.B >= 1 && a.H >= 1 && a.KV >= 1 && a.T >= 1 && a.S >= 1 && a.D >= 1,
                "attention: every size must be positive, got B=" + std::to_string(a.B) + " H=" + std::to_string(a.H) +
                    " KV=" + std::to_string(a.KV) + " T=" + std::to_string(a.T) + " S=" + std::to_string(a.S) +
                    " D=" + std::to_string(a.D));
  LOWRANK_CHECK(a.H % a.KV == 0, "key: " + std::to_string(a.KV) + " key/value heads do not divide " +
                                     std::to_string(a.H) + " query heads");
  LOWRANK_CHECK(a.T <= a.S, "query: more query positions (" + std::to_string(a.T) + ") than keys (" +
                                std::to_string(a.S) + ")");
  LOWRANK_CHECK(a.D <= kAttentionMaxHeadDim, "query: head dimension " + std::to_string(a.D) + " above " +
                                                 std::to_string(kAttentionMaxHeadDim));
  LOWRANK_CHECK(a.B * a.H < kMaxElements / a.T && extent_fits(a.B * a.H * a.T, a.S + a.D, a.S + a.D),
                "attention: too many elements");
  LOWRANK_CHECK(a.q.dtype == DType::float32 || a.q.dtype == DType::bfloat16,
                std::string("query: expected float32 or bfloat16, got ") + dtype_name(a.q.dtype));
  for (const auto& [t, name] : {std::pair{a.k, "key"}, std::pair{a.v, "value"}})
    LOWRANK_CHECK(t.dtype == a.q.dtype, std::string(name) + ": expected query's dtype " + dtype_name(a.q.dtype) +
                                            ", got " + dtype_name(t.dtype));
  LOWRANK_CHECK(a.q.ptr && a.k.ptr && a.v.ptr && a.lse, "attention: null address");
  if (a.kv_range) {
    const int64_t* r = reinterpret_cast<const int64_t*>(a.kv_range);
    for (int64_t b = 0; b < a.B; ++b)
      LOWRANK_CHECK(0 <= r[2 * b] && r[2 * b] <= r[2 * b + 1] && r[2 * b + 1] <= a.S,
                    "key_ranges: [" + std::to_string(r[2 * b]) + ", " + std::to_string(r[2 * b + 1]) +
                        ") at batch " + std::to_string(b) + ", expected 0 <= start <= end <= " + std::to_string(a.S));
  }
  if (forward)
    LOWRANK_CHECK(a.out.ptr && a.out.dtype == a.q.dtype, std::string("out: expected query's dtype ") +
                                                             dtype_name(a.q.dtype) + " and an address");
}

inline void validate_attention_backward(const AttentionBackwardArgs& a) {
  validate_attention(a.fwd, /*forward=*/false);
  for (const auto& [t, name] :
       {std::pair{a.dout, "grad_out"}, std::pair{a.dq, "grad_query"}, std::pair{a.dk, "grad_key"},
        std::pair{a.dv, "grad_value"}})
    LOWRANK_CHECK(t.dtype == a.fwd.q.dtype && t.ptr, std::string(name) + ": expected query's dtype " +
                                                         dtype_name(a.fwd.q.dtype) + " and an address");
}

void attention_cpu(const AttentionArgs& a, int num_threads);
void attention_backward_cpu(const AttentionBackwardArgs& a, int num_threads);

}  // namespace lowrank
