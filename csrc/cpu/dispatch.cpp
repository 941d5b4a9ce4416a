// Picks the CPU kernel variant at run time: AVX-512 with AVX512-BF16 where the CPU and OS support it, else
// AVX-512, else AVX2+FMA, else portable C++. LOWRANK_CPU_ISA (or set_cpu_isa) may force a lower one, e.g. for tests.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "lora.h"
#include "loss.h"
#include "mixed.h"
#include "nf4.h"
#include "pointwise.h"

namespace lowrank::cpu {

#define LOWRANK_DECLARE_ISA(ns)                                \
  namespace ns {                                               \
  void lora_rows(const LoraRowsArgs& a, int num_threads);      \
  void lora_input_grad(const LoraInputGradArgs& a, int num_threads); \
  void adapter_products(const AdapterProductsArgs& a, int num_threads); \
  void adapter_term(const AdapterTermArgs& a, int num_threads);      \
  void nf4_quantize(const Nf4QuantizeArgs& a, int num_threads);       \
  void nf4_double_quant(const Nf4DoubleQuantArgs& a, int num_threads); \
  void nf4_dequantize(const Nf4DequantizeArgs& a, int num_threads);   \
  void nf4_rows(const Nf4RowsArgs& a, int num_threads);               \
  void nf4_input_grad(const Nf4InputGradArgs& a, int num_threads);    \
  void nf4_tile(const Nf4Weight& w, const Nf4Tiled& p, int num_threads); \
  void nf4_rows_tiled(const Nf4TiledRowsArgs& a, int num_threads);  \
  bool nf4_tiled_supported(DType x_dtype);                           \
  void mixed_rows(const MixedRowsArgs& a, int num_threads);           \
  void cross_entropy(const CrossEntropyArgs& a, int num_threads);     \
  void cross_entropy_backward(const CrossEntropyBackwardArgs& a, int num_threads); \
  void attention(const AttentionArgs& a, int num_threads);                \
  void attention_backward(const AttentionBackwardArgs& a, int num_threads); \
  void rms_norm(const RMSNormArgs& a, int num_threads);                    \
  void rms_norm_backward(const RMSNormBackwardArgs& a, int num_threads);   \
  void silu_mul(const SiluMulArgs& a, int num_threads);                    \
  void silu_mul_backward(const SiluMulBackwardArgs& a, int num_threads);   \
  }
LOWRANK_DECLARE_ISA(portable)
LOWRANK_DECLARE_ISA(avx2)
LOWRANK_DECLARE_ISA(avx512)
LOWRANK_DECLARE_ISA(avx512bf16)
#undef LOWRANK_DECLARE_ISA

struct Variant {
  const char* name;
  void (*lora_rows)(const LoraRowsArgs&, int);
  void (*lora_input_grad)(const LoraInputGradArgs&, int);
  void (*adapter_products)(const AdapterProductsArgs&, int);
  void (*adapter_term)(const AdapterTermArgs&, int);
  void (*nf4_quantize)(const Nf4QuantizeArgs&, int);
  void (*nf4_double_quant)(const Nf4DoubleQuantArgs&, int);
  void (*nf4_dequantize)(const Nf4DequantizeArgs&, int);
  void (*nf4_rows)(const Nf4RowsArgs&, int);
  void (*nf4_input_grad)(const Nf4InputGradArgs&, int);
  void (*nf4_tile)(const Nf4Weight&, const Nf4Tiled&, int);
  void (*nf4_rows_tiled)(const Nf4TiledRowsArgs&, int);
  bool (*nf4_tiled_supported)(DType);
  void (*mixed_rows)(const MixedRowsArgs&, int);
  void (*cross_entropy)(const CrossEntropyArgs&, int);
  void (*cross_entropy_backward)(const CrossEntropyBackwardArgs&, int);
  void (*attention)(const AttentionArgs&, int);
  void (*attention_backward)(const AttentionBackwardArgs&, int);
  void (*rms_norm)(const RMSNormArgs&, int);
  void (*rms_norm_backward)(const RMSNormBackwardArgs&, int);
  void (*silu_mul)(const SiluMulArgs&, int);
  void (*silu_mul_backward)(const SiluMulBackwardArgs&, int);
};

// One variant's entry: its name and its namespace's kernels, in the struct's order.
#define LOWRANK_VARIANT(ns)                                                                                   \
  {#ns, &ns::lora_rows, &ns::lora_input_grad, &ns::adapter_products, &ns::adapter_term, &ns::nf4_quantize,      \
   &ns::nf4_double_quant, &ns::nf4_dequantize, &ns::nf4_rows, &ns::nf4_input_grad, &ns::nf4_tile,               \
   &ns::nf4_rows_tiled, &ns::nf4_tiled_supported, &ns::mixed_rows, &ns::cross_entropy,                          \
   &ns::cross_entropy_backward, &ns::attention, &ns::attention_backward, &ns::rms_norm, &ns::rms_norm_backward, \
   &ns::silu_mul, &ns::silu_mul_backward}
// Lowest first: best_variant() takes the last one the CPU supports.
static const Variant kVariants[] = {
    LOWRANK_VARIANT(portable),
    LOWRANK_VARIANT(avx2),
    LOWRANK_VARIANT(avx512),
    LOWRANK_VARIANT(avx512bf16),
};
#undef LOWRANK_VARIANT

static bool cpu_supports(const std::string& name) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512") return avx512;
  if (name == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  return name == "portable";
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Variant& v : kVariants)
    if (cpu_supports(v.name)) out.push_back(v.name);
  return out;
}

static const Variant* best_variant() {
  const Variant* best = &kVariants[0];
  for (const Variant& v : kVariants)
    if (cpu_supports(v.name)) best = &v;
  return best;
}

static const Variant* find_variant(const std::string& name) {
  for (const Variant& v : kVariants)
    if (name == v.name) return &v;
  return nullptr;
}

static const Variant*& active() {
  static const Variant* chosen = [] {
    const char* env = std::getenv("LOWRANK_CPU_ISA");
    if (env && *env) {
      const Variant* v = find_variant(env);
      if (v && cpu_supports(v->name)) return v;
    }
    return best_variant();
  }();
  return chosen;
}

std::string active_isa() { return active()->name; }

bool bf16_dot_available() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return std::strncmp(active()->name, "avx512", 6) == 0 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

void set_isa(const std::string& name) {
  const Variant* v = find_variant(name);
  LOWRANK_CHECK(v != nullptr, "isa: unknown CPU kernel variant '" + name + "' (portable, avx2, avx512, avx512bf16)");
  LOWRANK_CHECK(cpu_supports(name), "isa: this CPU cannot run the '" + name + "' kernels");
  active() = v;
}

}  // namespace lowrank::cpu

namespace lowrank {

// The fewest multiply-adds worth a thread of its own in the few-token kernels below (0: every call
// takes every thread it is given). Waking a second thread costs microseconds (2.9 against 0.4 µs for a
// 64 -> 64 row at M = 1 on a Zen 5), so small calls run on fewer threads. Measured per machine and thread
// count (ops/_dispatch.py, cpu_parallel_min_work) and set from Python.
static std::atomic<int64_t> g_min_work{0};

void set_parallel_min_work(int64_t work) {
  LOWRANK_CHECK(work >= 0, "work: expected a count of multiply-adds >= 0, got " + std::to_string(work));
  g_min_work.store(work, std::memory_order_relaxed);
}

int64_t parallel_min_work() { return g_min_work.load(std::memory_order_relaxed); }

// The threads a call of `work` multiply-adds takes: num_threads, or fewer, so that each has at least
// the measured minimum.
static int threads_for(double work, int num_threads) {
  const int64_t per = g_min_work.load(std::memory_order_relaxed);
  if (per <= 0 || num_threads <= 1) return num_threads;
  const double t = work / double(per);
  return t >= double(num_threads) ? num_threads : (t < 2.0 ? 1 : int(t));
}

static double rows_work(int64_t m, int64_t n, int64_t k, int64_t r) { return double(m) * double(n) * double(k + r); }

void lora_rows_cpu(const LoraRowsArgs& a, int num_threads) {
  validate_lora_rows(a, /*cuda=*/false);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cpu::active()->lora_rows(a, threads_for(rows_work(a.x.rows, a.w.rows, a.x.cols, a.v.cols), num_threads));
}

void lora_fused_cpu(const LoraRowsArgs& args, const Matrix& a, const Matrix& u, int num_threads) {
  const int64_t M = args.x.rows, K = args.x.cols, R = a.rows;
  num_threads = threads_for(rows_work(M, R, K, 0) + rows_work(M, args.w.rows, K, R), num_threads);  // u, then the rows
  LOWRANK_CHECK(args.v.ptr == 0, "v: the fused forward computes v (u = x aᵀ) itself");
  check_matrix(a, "a", R, K);
  LOWRANK_CHECK(a.dtype == DType::float32 || a.dtype == args.w.dtype,
                std::string("a: expected float32 or w's dtype, got ") + dtype_name(a.dtype));
  LOWRANK_CHECK(a.device == -1 && (u.ptr == 0 || u.device == -1), "lora_fused_cpu: every tensor must be on the CPU");
  if (u.ptr) {
    check_matrix(u, "u", M, R);
    LOWRANK_CHECK(u.dtype == DType::float32, std::string("u: expected float32, got ") + dtype_name(u.dtype));
  }
  LoraRowsArgs up = args;
  if (R == 0) {  // no adapter term: the rows kernel alone (e is [N, 0], often with no data pointer)
    up.e = up.col_scale = up.v_scale = Matrix{};
    validate_lora_rows(up, /*cuda=*/false);
    if (M > 0 && up.out.cols > 0) cpu::active()->lora_rows(up, num_threads);
    return;
  }
  LOWRANK_CHECK(extent_fits(M, R, R), "u: more than 2^48 elements");
  std::unique_ptr<float[]> scratch;  // u's home when the caller does not keep it (inference)
  if (!u.ptr) scratch.reset(new float[size_t(M * R)]);
  up.v = u.ptr ? u : Matrix{reinterpret_cast<std::uintptr_t>(scratch.get()), M, R, R, DType::float32, -1};
  // x, w and out are checked with up; a and u above: the down projection needs no checks of its own.
  validate_lora_rows(up, /*cuda=*/false);
  if (M == 0) return;
  LoraRowsArgs down{};
  down.out = up.v;
  down.x = args.x;
  down.w = a;
  down.scale = 1.0f;
  if (K > 0) {
    cpu::active()->lora_rows(down, num_threads);
  } else {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < R; ++j) up.v.data<float>()[m * up.v.ld + j] = 0.f;
  }
  if (up.out.cols > 0) cpu::active()->lora_rows(up, num_threads);
}

void lora_input_grad_cpu(const LoraInputGradArgs& a, int num_threads) {
  validate_lora_input_grad(a);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cpu::active()->lora_input_grad(a, threads_for(rows_work(a.dy.rows, a.dy.cols, a.out.cols, a.g.cols), num_threads));
}

void adapter_products_cpu(const AdapterProductsArgs& a, int num_threads) {
  validate_adapter_products(a);
  const int64_t R = a.c.ptr ? a.c.cols : (a.d_transposed ? a.d.rows : a.d.cols);
  const double work = double(a.x.rows) * double(a.x.cols) * double(R) * ((a.c.ptr && a.d.ptr) ? 2.0 : 1.0);
  cpu::active()->adapter_products(a, threads_for(work, num_threads));
}

void adapter_term_cpu(const AdapterTermArgs& a, int num_threads) {
  validate_adapter_term(a);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cpu::active()->adapter_term(a, threads_for(rows_work(a.out.rows, a.out.cols, 0, a.u.cols), num_threads));
}

void lora_backward_cpu(const LoraBackwardArgs& p, int num_threads) {
  const int64_t M = p.dy.rows, N = p.dy.cols, K = p.xa.cols;
  check_matrix(p.xa, "xa", M, K);
  LOWRANK_CHECK(p.xa.dtype == p.dy.dtype, std::string("xa: expected dy's dtype, got ") + dtype_name(p.xa.dtype));
  LOWRANK_CHECK(p.g.dtype == DType::float32, std::string("g: expected float32, got ") + dtype_name(p.g.dtype));
  AdapterProductsArgs up{p.dy, p.b, p.u, p.g, p.grad_b, false, false, p.scale};
  AdapterProductsArgs down{p.xa, Matrix{}, p.g, Matrix{}, p.grad_a, false, true, 1.0f};
  validate_adapter_products(up);  // dy, b [N, R], u [M, R], g [M, R], grad_b [N, R]
  validate_adapter_products(down);  // xa, g, grad_a [R, K]
  LOWRANK_CHECK(extent_fits(M, N + K, N + K), "dy: too many elements for the backward's scratch");
  const int64_t tasks = num_threads < 1 ? 1 : num_threads;
  thread_local std::vector<float> scratch;  // the input gradient's partial sums
  if (scratch.size() < size_t(tasks * M * K)) scratch.resize(size_t(tasks * M * K));
  LoraInputGradArgs ig{p.dx, p.dy, p.w, p.g, p.a,
                       Matrix{reinterpret_cast<std::uintptr_t>(scratch.data()), tasks * M, K, K, DType::float32, -1},
                       p.bf16_dot};
  validate_lora_input_grad(ig);  // dx [M, K], w [N, K], a [R, K]
  // The task count stays num_threads (the input gradient's partial sums, and so its bits, follow it,
  // as lora_input_grad_cpu's workspace rows do); a small call runs those tasks on fewer threads.
  const int threads = threads_for(rows_work(M, N, K, 3 * p.u.cols), int(tasks));
  cpu::active()->adapter_products(up, threads);
  cpu::active()->adapter_products(down, threads);
  cpu::active()->lora_input_grad(ig, threads);
}

void nf4_quantize_cpu(const Nf4QuantizeArgs& a, int num_threads) {
  validate_nf4_quantize(a, /*cuda=*/false);
  if (a.n == 0) return;
  cpu::active()->nf4_quantize(a, num_threads);
}

void nf4_double_quant_cpu(const Nf4DoubleQuantArgs& a, int num_threads) {
  validate_nf4_double_quant(a, /*cuda=*/false);
  if (a.n == 0) return;
  cpu::active()->nf4_double_quant(a, num_threads);
}

void nf4_dequantize_cpu(const Nf4DequantizeArgs& a, int num_threads) {
  validate_nf4_dequantize(a, /*cuda=*/false);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cpu::active()->nf4_dequantize(a, num_threads);
}

void nf4_input_grad_cpu(const Nf4InputGradArgs& a, int num_threads) {
  validate_nf4_input_grad(a);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cpu::active()->nf4_input_grad(a, threads_for(rows_work(a.dy.rows, a.dy.cols, a.out.cols, 0), num_threads));
}

int64_t validate_mixed_plan_cpu(const MixedRowsArgs& p) {
  const int64_t M = p.order.cols, A = p.offsets.cols - 1;
  const int32_t* order = p.order.data<int32_t>();
  const int32_t* offsets = p.offsets.data<int32_t>();
  std::vector<char> seen(size_t(M), 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t row = order[i];
    LOWRANK_CHECK(row >= 0 && row < M, "order: entry " + std::to_string(i) + " is " + std::to_string(row) +
                                   ", outside [0, " + std::to_string(M) + ")");
    LOWRANK_CHECK(!seen[size_t(row)], "order: row " + std::to_string(row) + " appears twice (expected a permutation)");
    seen[size_t(row)] = 1;
  }
  LOWRANK_CHECK(offsets[0] == 0, "offsets: expected offsets[0] == 0, got " + std::to_string(offsets[0]));
  for (int64_t i = 0; i < A; ++i)
    LOWRANK_CHECK(offsets[i + 1] >= offsets[i] && offsets[i + 1] <= M,
          "offsets: expected non-decreasing values in [0, " + std::to_string(M) + "], got " +
              std::to_string(offsets[i + 1]) + " after " + std::to_string(offsets[i]));
  const int64_t P = offsets[A];
  if (p.h.ptr) LOWRANK_CHECK(p.h.rows == P, "h: expected " + std::to_string(P) + " rows (offsets[-1]), got " + std::to_string(p.h.rows));
  for (const MixedAdapter& ad : p.adapters->items)
    LOWRANK_CHECK(ad.a.dtype != DType::float16 && ad.e.dtype != DType::float16,
          "adapters: float16 factors run on CUDA only (use float32 or bfloat16 on the CPU)");
  return P;
}

void mixed_rows_cpu(const MixedRowsArgs& a, int num_threads) {
  validate_mixed_rows(a, /*cuda=*/false);
  validate_mixed_plan_cpu(a);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cpu::active()->mixed_rows(a, num_threads);
}

void nf4_rows_cpu(const Nf4RowsArgs& a, int num_threads) {
  validate_nf4_rows(a, /*cuda=*/false);
  if (a.out.rows == 0 || a.out.cols == 0) return;
  cpu::active()->nf4_rows(a, threads_for(rows_work(a.x.rows, a.w.rows, a.x.cols, a.v.cols), num_threads));
}

bool nf4_tiled_available(DType x_dtype) { return cpu::active()->nf4_tiled_supported(x_dtype); }

void nf4_tile_cpu(const Nf4Weight& w, const Nf4Tiled& p, int num_threads) {
  validate_nf4_weight(w, "weight");
  LOWRANK_CHECK(w.device == -1, "weight: must be on the CPU");
  LOWRANK_CHECK(nf4_tileable(w), "weight: the tiled layout needs in_features % blocksize == 0");
  validate_nf4_tiled(p, "tiled");
  LOWRANK_CHECK(p.rows == w.rows && p.cols == w.cols && p.blocksize == w.blocksize,
                "tiled: shape or blocksize differs from the weight's");
  cpu::active()->nf4_tile(w, p, num_threads);
}

void nf4_rows_tiled_cpu(const Nf4TiledRowsArgs& a, int num_threads) {
  validate_nf4_tiled_rows(a);
  if (a.out.rows == 0) return;
  cpu::active()->nf4_rows_tiled(a, threads_for(rows_work(a.x.rows, a.w.rows, a.x.cols, a.v.cols), num_threads));
}

void attention_cpu(const AttentionArgs& a, int num_threads) {
  validate_attention(a);
  const double work = double(a.B) * double(a.H) * double(a.T) * double(a.S) * double(a.D);
  cpu::active()->attention(a, threads_for(work, num_threads));
}

void attention_backward_cpu(const AttentionBackwardArgs& a, int num_threads) {
  validate_attention_backward(a);
  const AttentionArgs& f = a.fwd;
  const double work = 2.0 * double(f.B) * double(f.H) * double(f.T) * double(f.S) * double(f.D);
  cpu::active()->attention_backward(a, threads_for(work, num_threads));
}

void cross_entropy_cpu(const CrossEntropyArgs& a, int num_threads) {
  validate_cross_entropy(a, /*cuda=*/false);
  check_labels_host(a.labels, a.logits.cols, a.ignore_index);
  if (a.logits.rows == 0) return;  // with no classes every label is ignore_index: every row is 0
  cpu::active()->cross_entropy(a, num_threads);
}

void cross_entropy_backward_cpu(const CrossEntropyBackwardArgs& a, int num_threads) {
  validate_cross_entropy_backward(a, /*cuda=*/false);
  check_labels_host(a.labels, a.logits.cols, a.ignore_index);
  if (a.logits.rows == 0 || a.logits.cols == 0) return;
  cpu::active()->cross_entropy_backward(a, num_threads);
}

void rms_norm_cpu(const RMSNormArgs& a, int num_threads) {
  validate_rms_norm(a);
  if (a.x.rows == 0 || a.x.cols == 0) {
    for (int64_t m = 0; m < a.x.rows; ++m) a.rstd.data<float>()[m] = 1.0f / std::sqrt(a.eps);  // mean of nothing: 0
    return;
  }
  cpu::active()->rms_norm(a, threads_for(double(a.x.rows) * double(a.x.cols), num_threads));
}

void rms_norm_backward_cpu(const RMSNormBackwardArgs& a, int num_threads) {
  validate_rms_norm_backward(a);
  if (a.x.rows == 0 || a.x.cols == 0) {
    if (a.grad_weight.ptr)  // no rows: every weight gradient is 0 (+0 in fp32 and bf16 alike)
      std::memset(reinterpret_cast<void*>(a.grad_weight.ptr), 0, size_t(a.x.cols) * dtype_size(a.x.dtype));
    return;
  }
  cpu::active()->rms_norm_backward(a, threads_for(2.0 * double(a.x.rows) * double(a.x.cols), num_threads));
}

void silu_mul_cpu(const SiluMulArgs& a, int num_threads) {
  validate_silu_mul(a);
  if (a.gate.rows == 0 || a.gate.cols == 0) return;
  cpu::active()->silu_mul(a, threads_for(double(a.gate.rows) * double(a.gate.cols), num_threads));
}

void silu_mul_backward_cpu(const SiluMulBackwardArgs& a, int num_threads) {
  validate_silu_mul_backward(a);
  if (a.gate.rows == 0 || a.gate.cols == 0) return;
  cpu::active()->silu_mul_backward(a, threads_for(2.0 * double(a.gate.rows) * double(a.gate.cols), num_threads));
}

}  // namespace lowrank
