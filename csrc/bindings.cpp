// lowrank._C: the pybind11 module. Typed signatures, sizes re-checked in the launchers, C++
// exceptions become Python exceptions (std::invalid_argument -> ValueError), the GIL is released
// while kernels run. Python (lowrank/_validate.py) builds the Matrix views from torch tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "attention.h"
#include "lora.h"
#include "loss.h"
#include "mixed.h"
#include "nf4.h"
#include "pointwise.h"

namespace py = pybind11;
using namespace lowrank;

namespace lowrank::cpu {
std::vector<std::string> supported_isas();
bool bf16_dot_available();
std::string active_isa();
void set_isa(const std::string& name);
}  // namespace lowrank::cpu

#ifdef LOWRANK_WITH_CUDA
namespace lowrank::cuda {
int device_count();
int runtime_version();
}  // namespace lowrank::cuda
#endif

static Matrix opt(const std::optional<Matrix>& m) { return m ? *m : Matrix{}; }

static MixedAdapters make_mixed_adapters(const std::vector<Matrix>& a, const std::vector<Matrix>& e,
                                         const std::vector<std::optional<Matrix>>& v_scale,
                                         const std::vector<std::optional<Matrix>>& col_scale,
                                         const std::vector<float>& scale,
                                         const std::vector<std::optional<Matrix>>& et) {
  const size_t n = a.size();
  LOWRANK_CHECK(e.size() == n && v_scale.size() == n && col_scale.size() == n && scale.size() == n &&
            (et.empty() || et.size() == n),
        "adapters: a, e, v_scale, col_scale and scale must have one entry per adapter (et: one or none)");
  LOWRANK_CHECK(n >= 1, "adapters: expected at least one adapter");
  MixedAdapters t;
  t.K = a[0].cols;
  t.N = e[0].rows;
  t.device = a[0].device;
  for (size_t i = 0; i < n; ++i) {
    t.items.push_back(MixedAdapter{a[i], e[i], opt(v_scale[i]), opt(col_scale[i]), scale[i],
                                   et.empty() ? Matrix{} : opt(et[i])});
    t.max_r = std::max<int64_t>(t.max_r, a[i].rows);
  }
  validate_mixed_adapters(t);
  return t;
}

static MixedRowsArgs mixed_rows_args(const Matrix& out, const Matrix& x, const std::optional<Matrix>& xa,
                                     const std::optional<Matrix>& w, const std::optional<Matrix>& bias,
                                     const std::optional<Matrix>& c, const Matrix& order, const Matrix& offsets,
                                     const std::optional<Matrix>& h, const MixedAdapters& adapters) {
  return MixedRowsArgs{out, x, opt(xa), opt(w), opt(bias), opt(c), order, offsets, opt(h), &adapters};
}

static LoraRowsArgs lora_rows_args(const Matrix& out, const Matrix& x, const Matrix& w,
                                   const std::optional<Matrix>& bias, const std::optional<Matrix>& v,
                                   const std::optional<Matrix>& e, const std::optional<Matrix>& col_scale,
                                   const std::optional<Matrix>& v_scale, float scale) {
  LoraRowsArgs a;
  a.out = out;
  a.x = x;
  a.w = w;
  a.bias = opt(bias);
  a.v = opt(v);
  a.e = opt(e);
  a.col_scale = opt(col_scale);
  a.v_scale = opt(v_scale);
  a.scale = scale;
  return a;
}

// A layer's few-token inference call with everything but x and out fixed: the kernel views of the
// weight (plain, NF4 row-major or NF4 tiled), bias and B, the scale and the dtypes. Python builds one
// per layer after the op's full checks (ops/lora.py, ops/nf4.py: CallPlan) and calls run() with the
// raw addresses of a contiguous x [m, k] it has checked, a fresh out [m, n] and, for NF4 with an
// adapter, u = x Aᵀ [m, r] in fp32 (LoRA's fused kernel makes u itself): one call instead of building
// three Matrix views per call. The launchers re-check every size as usual.
struct RowsPlan {
  enum class Kind { lora_fused, nf4_rows, nf4_tiled };
  Kind kind = Kind::lora_fused;
  Matrix w, bias, a, e;
  Nf4Weight nf4{};
  Nf4Tiled tiled{};
  int64_t k = 0, n = 0, r = 0;
  DType x_dtype = DType::float32, out_dtype = DType::float32;
  float scale = 1.0f;
  bool bf16_dot = false;

  void run(std::uintptr_t out_ptr, std::uintptr_t x_ptr, int64_t m, std::uintptr_t u_ptr, int num_threads) const {
    LOWRANK_CHECK(m >= 0, "m: negative");
    LOWRANK_CHECK(out_ptr != 0 && x_ptr != 0, "out, x: null addresses");
    const Matrix x{x_ptr, m, k, k, x_dtype, -1}, out{out_ptr, m, n, n, out_dtype, -1};
    const Matrix u = u_ptr ? Matrix{u_ptr, m, r, r, DType::float32, -1} : Matrix{};
    switch (kind) {
      case Kind::lora_fused: {
        LoraRowsArgs args;
        args.out = out;
        args.x = x;
        args.w = w;
        args.bias = bias;
        args.e = e;
        args.scale = scale;
        py::gil_scoped_release nogil;
        lora_fused_cpu(args, a, u, num_threads);
        return;
      }
      case Kind::nf4_rows: {
        LOWRANK_CHECK(r == 0 || u_ptr != 0, "u: the adapter's u = x Aᵀ is required");
        const Nf4RowsArgs args{out, x, nf4, bias, u, u_ptr ? e : Matrix{}, scale, bf16_dot};
        py::gil_scoped_release nogil;
        nf4_rows_cpu(args, num_threads);
        return;
      }
      case Kind::nf4_tiled: {
        LOWRANK_CHECK(r == 0 || u_ptr != 0, "u: the adapter's u = x Aᵀ is required");
        const Nf4TiledRowsArgs args{out, x, tiled, bias, u, u_ptr ? e : Matrix{}, scale};
        py::gil_scoped_release nogil;
        nf4_rows_tiled_cpu(args, num_threads);
        return;
      }
    }
  }
};

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowrank kernels (CPU and, when built, CUDA). Use lowrank.ops, not this module.";

  py::enum_<DType>(m, "DType")
      .value("float32", DType::float32)
      .value("bfloat16", DType::bfloat16)
      .value("float16", DType::float16)
      .value("uint8", DType::uint8)
      .value("int32", DType::int32)
      .value("int64", DType::int64);

  py::class_<Matrix>(m, "Matrix", "A strided row-major view: element (i, j) at ptr + (i*ld + j)*itemsize")
      // Positional only: built several times per layer call, keyword matching would cost more.
      // The last argument is the object that owns the memory (lowrank._validate.matrix passes the tensor,
      // or None): the Matrix keeps it alive, so a view of a temporary (a contiguous copy made for the
      // call) cannot be freed, and its memory handed to the next temporary, before the kernel reads it.
      .def(py::init([](std::uintptr_t ptr, int64_t rows, int64_t cols, int64_t ld, DType dtype, int device,
                       const py::object&) {
             LOWRANK_CHECK(rows >= 0 && cols >= 0, "Matrix: negative size");
             return Matrix{ptr, rows, cols, ld, dtype, device};
           }),
           py::keep_alive<1, 8>())
      .def_readonly("rows", &Matrix::rows)
      .def_readonly("cols", &Matrix::cols)
      .def_readonly("ld", &Matrix::ld)
      .def_readonly("dtype", &Matrix::dtype)
      .def_readonly("device", &Matrix::device);

  m.def(
      "lora_rows_cpu",
      [](const Matrix& out, const Matrix& x, const Matrix& w, const std::optional<Matrix>& bias,
         const std::optional<Matrix>& v, const std::optional<Matrix>& e, const std::optional<Matrix>& col_scale,
         const std::optional<Matrix>& v_scale, float scale, int num_threads) {
        LoraRowsArgs a = lora_rows_args(out, x, w, bias, v, e, col_scale, v_scale, scale);
        py::gil_scoped_release nogil;
        lora_rows_cpu(a, num_threads);
      },
      "out[m,n] = x[m]·w[n] + scale * col_scale[n] * (v[m] ⊙ v_scale)·e[n] + bias[n] (fp32 accumulation)",
      py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("v"), py::arg("e"), py::arg("col_scale"),
      py::arg("v_scale"), py::arg("scale"), py::arg("num_threads"));

  m.def(
      "lora_fused_cpu",
      [](const Matrix& out, const Matrix& x, const Matrix& w, const std::optional<Matrix>& bias, const Matrix& a,
         const Matrix& e, const std::optional<Matrix>& u, const std::optional<Matrix>& col_scale,
         const std::optional<Matrix>& v_scale, float scale, int num_threads) {
        LoraRowsArgs args = lora_rows_args(out, x, w, bias, std::nullopt, e, col_scale, v_scale, scale);
        const Matrix u_out = opt(u);
        py::gil_scoped_release nogil;
        lora_fused_cpu(args, a, u_out, num_threads);
      },
      "u = x aᵀ (fp32; into `u` when given, unscaled), then out = x wᵀ + scale * col_scale ⊙ (u ⊙ v_scale) eᵀ + "
      "bias: the fused LoRA (and VeRA: col_scale b, v_scale d) forward in one call (positional arguments: out, x, w, "
      "bias, a, e, u, col_scale, v_scale, scale, num_threads)");

  m.def(
      "lora_input_grad_cpu",
      [](const Matrix& out, const Matrix& dy, const Matrix& w, const std::optional<Matrix>& g,
         const std::optional<Matrix>& a, const Matrix& workspace, int num_threads, bool bf16_dot) {
        LoraInputGradArgs p{out, dy, w, opt(g), opt(a), workspace, bf16_dot};
        py::gil_scoped_release nogil;
        lora_input_grad_cpu(p, num_threads);
      },
      "out[m,k] = dy[m]·w[:,k] + g[m]·a[:,k] (fp32 accumulation; workspace: fp32 [tasks*M, K]; a bf16 dy is "
      "read as it is by AVX512-BF16 products where the CPU has them and bf16_dot is set, else widened)",
      py::arg("out"), py::arg("dy"), py::arg("w"), py::arg("g"), py::arg("a"), py::arg("workspace"),
      py::arg("num_threads"), py::arg("bf16_dot") = true);

  m.def(
      "adapter_products_cpu",
      [](const std::optional<Matrix>& c, const std::optional<Matrix>& d, const Matrix& x,
         const std::optional<Matrix>& y, const std::optional<Matrix>& u, bool y_transposed, bool d_transposed,
         float scale, int num_threads) {
        AdapterProductsArgs p{x, opt(y), opt(u), opt(c), opt(d), y_transposed, d_transposed, scale};
        py::gil_scoped_release nogil;
        adapter_products_cpu(p, num_threads);
      },
      "c = scale * x y and/or d = scale * xᵀ u from one pass over x (fp32 accumulation; y read as [R, K] with "
      "y_transposed, d written as [R, K] with d_transposed; positional arguments: c, d, x, y, u, y_transposed, "
      "d_transposed, scale, num_threads)");

  m.def(
      "adapter_term_cpu",
      [](const Matrix& out, const Matrix& u, const Matrix& e, const std::optional<Matrix>& bias, float scale,
         bool e_transposed, int num_threads, const std::optional<Matrix>& col_scale) {
        AdapterTermArgs p{out, u, e, opt(bias), scale, e_transposed, opt(col_scale)};
        py::gil_scoped_release nogil;
        adapter_term_cpu(p, num_threads);
      },
      py::arg("out"), py::arg("u"), py::arg("e"), py::arg("bias"), py::arg("scale"), py::arg("e_transposed"),
      py::arg("num_threads"), py::arg("col_scale") = py::none(),
      "out = bias + scale * col_scale ⊙ u eᵀ (fp32 sums, one rounding; e read as [R, N] with e_transposed, "
      "in place where it is fp32; col_scale [1, N] fp32 or None)");

  m.def(
      "lora_backward_cpu",
      [](const Matrix& dx, const Matrix& grad_a, const Matrix& grad_b, const Matrix& g, const Matrix& dy,
         const Matrix& xa, const Matrix& u, const Matrix& w, const Matrix& a, const Matrix& b, float scale,
         int num_threads, bool bf16_dot) {
        LoraBackwardArgs p{dx, grad_a, grad_b, g, dy, xa, u, w, a, b, scale, bf16_dot};
        py::gil_scoped_release nogil;
        lora_backward_cpu(p, num_threads);
      },
      "The LoRA backward for few tokens in one call: g = scale * dy b, grad_b = scale * dyᵀ u, grad_a = gᵀ xa, "
      "dx = dy w + g a (positional arguments: dx, grad_a, grad_b, g, dy, xa, u, w, a, b, scale, num_threads, "
      "bf16_dot: a bf16 dy read as it is by dx's AVX512-BF16 products where the CPU has them, else widened)",
      py::arg("dx"), py::arg("grad_a"), py::arg("grad_b"), py::arg("g"), py::arg("dy"), py::arg("xa"), py::arg("u"),
      py::arg("w"), py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("num_threads"), py::arg("bf16_dot") = false);

#ifdef LOWRANK_WITH_CUDA
  m.def(
      "lora_rows_cuda",
      [](const Matrix& out, const Matrix& x, const Matrix& w, const std::optional<Matrix>& bias,
         const std::optional<Matrix>& v, const std::optional<Matrix>& e, const std::optional<Matrix>& col_scale,
         const std::optional<Matrix>& v_scale, float scale, std::uintptr_t stream) {
        LoraRowsArgs a = lora_rows_args(out, x, w, bias, v, e, col_scale, v_scale, scale);
        py::gil_scoped_release nogil;
        lora_rows_cuda(a, stream);
      },
      "CUDA version of lora_rows_cpu; runs on `stream` (a raw cudaStream_t)", py::arg("out"), py::arg("x"),
      py::arg("w"), py::arg("bias"), py::arg("v"), py::arg("e"), py::arg("col_scale"), py::arg("v_scale"),
      py::arg("scale"), py::arg("stream"));
#endif

  // ---- mixed-adapter batches ---------------------------------------------------------------------
  py::class_<RowsPlan>(m, "RowsPlan",
                       "A layer's few-token inference call with the weight, bias, B, scale and dtypes fixed: "
                       "run(out_ptr, x_ptr, m, u_ptr, num_threads) on contiguous x [m, k] and out [m, n]")
      .def_static(
          "lora",
          [](const Matrix& w, const std::optional<Matrix>& bias, const Matrix& a, const Matrix& e, float scale,
             DType x_dtype, DType out_dtype) {
            RowsPlan p;
            p.kind = RowsPlan::Kind::lora_fused;
            p.w = w, p.bias = opt(bias), p.a = a, p.e = e, p.scale = scale;
            p.k = w.cols, p.n = w.rows, p.r = a.rows, p.x_dtype = x_dtype, p.out_dtype = out_dtype;
            return p;
          },
          "the fused LoRA rows (lora_fused_cpu: u = x aᵀ made inside)")
      .def_static(
          "nf4_rows",
          [](const Nf4Weight& w, const std::optional<Matrix>& bias, const std::optional<Matrix>& e, float scale,
             DType x_dtype, DType out_dtype, bool bf16_dot) {
            RowsPlan p;
            p.kind = RowsPlan::Kind::nf4_rows;
            p.nf4 = w, p.bias = opt(bias), p.e = opt(e), p.scale = scale, p.bf16_dot = bf16_dot;
            p.k = w.cols, p.n = w.rows, p.r = e ? e->cols : 0, p.x_dtype = x_dtype, p.out_dtype = out_dtype;
            return p;
          },
          "the NF4 rows kernel over the stored codes (nf4_rows_cpu)")
      .def_static(
          "nf4_tiled",
          [](const Nf4Tiled& w, const std::optional<Matrix>& bias, const std::optional<Matrix>& e, float scale,
             DType x_dtype, DType out_dtype) {
            RowsPlan p;
            p.kind = RowsPlan::Kind::nf4_tiled;
            p.tiled = w, p.bias = opt(bias), p.e = opt(e), p.scale = scale;
            p.k = w.cols, p.n = w.rows, p.r = e ? e->cols : 0, p.x_dtype = x_dtype, p.out_dtype = out_dtype;
            return p;
          },
          "the NF4 rows kernel over the tiled inference copy (nf4_rows_tiled_cpu)")
      .def_readonly("k", &RowsPlan::k)
      .def_readonly("n", &RowsPlan::n)
      .def_readonly("r", &RowsPlan::r)
      .def("run", &RowsPlan::run, "out_ptr, x_ptr, m, u_ptr (0: none), num_threads");

  py::class_<MixedAdapters>(m, "MixedAdapters", "The adapters one layer may use in a mixed batch (raw views)")
      .def(py::init(&make_mixed_adapters), py::arg("a"), py::arg("e"), py::arg("v_scale"), py::arg("col_scale"),
           py::arg("scale"), py::arg("et") = std::vector<std::optional<Matrix>>{})
      .def_property_readonly("count", [](const MixedAdapters& t) { return t.items.size(); })
      .def_readonly("max_r", &MixedAdapters::max_r)
      .def_readonly("in_features", &MixedAdapters::K)
      .def_readonly("out_features", &MixedAdapters::N);

  m.def(
      "mixed_rows_cpu",
      [](const Matrix& out, const Matrix& x, const std::optional<Matrix>& xa, const std::optional<Matrix>& w,
         const std::optional<Matrix>& bias, const std::optional<Matrix>& c, const Matrix& order, const Matrix& offsets,
         const std::optional<Matrix>& h, const MixedAdapters& adapters, int num_threads) {
        MixedRowsArgs a = mixed_rows_args(out, x, xa, w, bias, c, order, offsets, h, adapters);
        py::gil_scoped_release nogil;
        mixed_rows_cpu(a, num_threads);
      },
      "out[m] = c[m] + x[m]·wᵀ + bias + T_adapter(m)(xa[m]) for rows grouped by adapter (see csrc/mixed.h)",
      py::arg("out"), py::arg("x"), py::arg("xa"), py::arg("w"), py::arg("bias"), py::arg("c"), py::arg("order"),
      py::arg("offsets"), py::arg("h"), py::arg("adapters"), py::arg("num_threads"));

#ifdef LOWRANK_WITH_CUDA
  m.def(
      "mixed_rows_cuda",
      [](const Matrix& out, const Matrix& x, const std::optional<Matrix>& xa, const std::optional<Matrix>& w,
         const std::optional<Matrix>& bias, const std::optional<Matrix>& c, const Matrix& order, const Matrix& offsets,
         const std::optional<Matrix>& h, const MixedAdapters& adapters, std::uintptr_t stream) {
        MixedRowsArgs a = mixed_rows_args(out, x, xa, w, bias, c, order, offsets, h, adapters);
        py::gil_scoped_release nogil;
        mixed_rows_cuda(a, stream);
      },
      "CUDA version of mixed_rows_cpu; runs on `stream` (a raw cudaStream_t)", py::arg("out"), py::arg("x"),
      py::arg("xa"), py::arg("w"), py::arg("bias"), py::arg("c"), py::arg("order"), py::arg("offsets"), py::arg("h"),
      py::arg("adapters"), py::arg("stream"));
#endif

  // ---- NF4 -------------------------------------------------------------------------------------
  py::class_<Nf4Weight>(m, "Nf4Weight", "A packed NF4 weight: raw addresses of codes and scales, shape, block sizes")
      .def(py::init([](std::uintptr_t codes, int64_t rows, int64_t cols, int64_t blocksize, std::uintptr_t absmax,
                       std::uintptr_t qabsmax, std::uintptr_t code2, std::uintptr_t absmax2, std::uintptr_t offset,
                       int64_t blocksize2, int device) {
        Nf4Weight w{codes, rows, cols, blocksize, absmax, qabsmax, code2, absmax2, offset, blocksize2, device};
        validate_nf4_weight(w, "weight");
        return w;
      }))
      .def_readonly("rows", &Nf4Weight::rows)
      .def_readonly("cols", &Nf4Weight::cols)
      .def_readonly("blocksize", &Nf4Weight::blocksize);

  m.def(
      "nf4_quantize_cpu",
      [](std::uintptr_t input, DType dtype, int64_t n, int64_t blocksize, std::uintptr_t codes, std::uintptr_t absmax,
         int num_threads) {
        Nf4QuantizeArgs a{input, dtype, n, blocksize, codes, absmax, 0, -1};
        py::gil_scoped_release nogil;
        nf4_quantize_cpu(a, num_threads);
      },
      "NF4 codes (2 per byte, first in the high nibble) and fp32 absmax of n contiguous values");
  m.def(
      "nf4_double_quant_cpu",
      [](std::uintptr_t absmax, int64_t n, std::uintptr_t offset, std::uintptr_t code2, int64_t blocksize2,
         std::uintptr_t qabsmax, std::uintptr_t absmax2, int num_threads) {
        Nf4DoubleQuantArgs a{absmax, n, offset, code2, blocksize2, qabsmax, absmax2, -1};
        py::gil_scoped_release nogil;
        nf4_double_quant_cpu(a, num_threads);
      },
      "8-bit codes of absmax - offset in blocks of blocksize2, nearest entry of code2");
  m.def(
      "nf4_dequantize_cpu",
      [](const Nf4Weight& w, int64_t row0, const Matrix& out, int num_threads, int64_t col0) {
        Nf4DequantizeArgs a{w, row0, out, col0};
        py::gil_scoped_release nogil;
        nf4_dequantize_cpu(a, num_threads);
      },
      "out[i, j] = dequant(W)[row0 + i, col0 + j] (fp32 decode, one rounding to out's dtype)",
      py::arg("w"), py::arg("row0"), py::arg("out"), py::arg("num_threads"), py::arg("col0") = 0);
  m.def(
      "nf4_rows_cpu",
      [](const Matrix& out, const Matrix& x, const Nf4Weight& w, const std::optional<Matrix>& bias,
         const std::optional<Matrix>& v, const std::optional<Matrix>& e, float scale, int num_threads,
         bool bf16_dot) {
        Nf4RowsArgs a{out, x, w, opt(bias), opt(v), opt(e), scale, bf16_dot};
        py::gil_scoped_release nogil;
        nf4_rows_cpu(a, num_threads);
      },
      "out[m,n] = x[m]·dequant(W)[n] + bias[n] + scale * v[m]·e[n] (fp32 accumulation). bf16_dot: a bf16 x "
      "may take the AVX512-BF16 products over W rounded once to bf16 (where the CPU has them; else x is "
      "widened and W stays exact)",
      py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("v"), py::arg("e"), py::arg("scale"),
      py::arg("num_threads"), py::arg("bf16_dot") = false);

  py::class_<Nf4Tiled>(m, "Nf4Tiled", "An NF4 weight's inference copy in tiles of 16 rows (nf4.h): raw addresses and shape")
      .def(py::init([](std::uintptr_t codes, std::uintptr_t scales, int64_t rows, int64_t cols, int64_t blocksize) {
        Nf4Tiled p{codes, scales, rows, cols, blocksize};
        validate_nf4_tiled(p, "tiled");
        return p;
      }))
      .def_readonly("rows", &Nf4Tiled::rows)
      .def_readonly("cols", &Nf4Tiled::cols)
      .def_readonly("blocksize", &Nf4Tiled::blocksize)
      .def_static("code_bytes", [](int64_t rows, int64_t cols) { return Nf4Tiled{0, 0, rows, cols, 64}.code_bytes(); })
      .def_static("scale_count", [](int64_t rows, int64_t cols, int64_t blocksize) {
        return Nf4Tiled{0, 0, rows, cols, blocksize}.scale_count();
      });
  m.def("nf4_tileable", [](const Nf4Weight& w) { return nf4_tileable(w); },
        "whether the weight's shape and blocksize allow the tiled layout (in_features % blocksize == 0)");
  m.def("nf4_tiled_available", [](DType x) { return nf4_tiled_available(x); },
        "whether the CPU kernel variant in use runs the tiled kernel for x of this dtype");
  m.def(
      "nf4_tile_cpu",
      [](const Nf4Weight& w, const Nf4Tiled& p, int num_threads) {
        py::gil_scoped_release nogil;
        nf4_tile_cpu(w, p, num_threads);
      },
      "fills the tiled copy's codes and scales from the weight");
  m.def(
      "nf4_rows_tiled_cpu",
      [](const Matrix& out, const Matrix& x, const Nf4Tiled& w, const std::optional<Matrix>& bias,
         const std::optional<Matrix>& v, const std::optional<Matrix>& e, float scale, int num_threads) {
        Nf4TiledRowsArgs a{out, x, w, opt(bias), opt(v), opt(e), scale};
        py::gil_scoped_release nogil;
        nf4_rows_tiled_cpu(a, num_threads);
      },
      "nf4_rows_cpu over the tiled copy: out[m,n] = x[m]·dequant(W)[n] + bias[n] + scale * v[m]·e[n]",
      py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("v"), py::arg("e"), py::arg("scale"),
      py::arg("num_threads"));

  m.def(
      "nf4_input_grad_cpu",
      [](const Matrix& out, const Matrix& dy, const Nf4Weight& w, const Matrix& workspace, int num_threads,
         bool bf16_dot) {
        Nf4InputGradArgs a{out, dy, w, workspace, bf16_dot};
        py::gil_scoped_release nogil;
        nf4_input_grad_cpu(a, num_threads);
      },
      "out = dy · dequant(W) with fp32 sums, W decoded once per tile of dy rows (workspace: fp32 [tasks*M, K]; a bf16 dy is read "
      "as it is by AVX512-BF16 products over W rounded once to bf16 where the CPU has them and bf16_dot is set, "
      "else widened against the exact fp32 W)",
      py::arg("out"), py::arg("dy"), py::arg("w"), py::arg("workspace"), py::arg("num_threads"),
      py::arg("bf16_dot") = true);

#ifdef LOWRANK_WITH_CUDA
  m.def(
      "nf4_quantize_cuda",
      [](std::uintptr_t input, DType dtype, int64_t n, int64_t blocksize, std::uintptr_t codes, std::uintptr_t absmax,
         std::uintptr_t status, int device, std::uintptr_t stream) {
        Nf4QuantizeArgs a{input, dtype, n, blocksize, codes, absmax, status, device};
        py::gil_scoped_release nogil;
        nf4_quantize_cuda(a, stream);
      });
  m.def(
      "nf4_double_quant_cuda",
      [](std::uintptr_t absmax, int64_t n, std::uintptr_t offset, std::uintptr_t code2, int64_t blocksize2,
         std::uintptr_t qabsmax, std::uintptr_t absmax2, int device, std::uintptr_t stream) {
        Nf4DoubleQuantArgs a{absmax, n, offset, code2, blocksize2, qabsmax, absmax2, device};
        py::gil_scoped_release nogil;
        nf4_double_quant_cuda(a, stream);
      });
  m.def("nf4_dequantize_cuda", [](const Nf4Weight& w, int64_t row0, const Matrix& out, std::uintptr_t stream) {
    Nf4DequantizeArgs a{w, row0, out};
    py::gil_scoped_release nogil;
    nf4_dequantize_cuda(a, stream);
  });
  m.def(
      "nf4_rows_cuda",
      [](const Matrix& out, const Matrix& x, const Nf4Weight& w, const std::optional<Matrix>& bias,
         const std::optional<Matrix>& v, const std::optional<Matrix>& e, float scale, std::uintptr_t stream) {
        Nf4RowsArgs a{out, x, w, opt(bias), opt(v), opt(e), scale};
        py::gil_scoped_release nogil;
        nf4_rows_cuda(a, stream);
      });
#endif

  m.def(
      "cross_entropy_cpu",
      [](const Matrix& logits, const Matrix& labels, const Matrix& loss, const Matrix& lse, int64_t ignore_index,
         int num_threads) {
        CrossEntropyArgs a{logits, labels, loss, lse, ignore_index};
        py::gil_scoped_release nogil;
        cross_entropy_cpu(a, num_threads);
      },
      "loss[i] = lse[i] - logits[i, labels[i]], lse[i] = log sum_j exp(logits[i, j]) (fp32; 0 where labels[i] == "
      "ignore_index)");
  m.def(
      "cross_entropy_backward_cpu",
      [](const Matrix& grad, const Matrix& logits, const Matrix& labels, const Matrix& lse, const Matrix& grad_loss,
         int64_t ignore_index, int num_threads) {
        CrossEntropyBackwardArgs a{grad, logits, labels, lse, grad_loss, ignore_index};
        py::gil_scoped_release nogil;
        cross_entropy_backward_cpu(a, num_threads);
      },
      "grad[i, j] = grad_loss[i] * (exp(logits[i, j] - lse[i]) - [j == labels[i]]), 0 in ignored rows");
#ifdef LOWRANK_WITH_CUDA
  m.def("cross_entropy_cuda", [](const Matrix& logits, const Matrix& labels, const Matrix& loss, const Matrix& lse,
                                 int64_t ignore_index, std::uintptr_t stream) {
    CrossEntropyArgs a{logits, labels, loss, lse, ignore_index};
    py::gil_scoped_release nogil;
    cross_entropy_cuda(a, stream);
  });
  m.def("cross_entropy_backward_cuda", [](const Matrix& grad, const Matrix& logits, const Matrix& labels,
                                          const Matrix& lse, const Matrix& grad_loss, int64_t ignore_index,
                                          std::uintptr_t stream) {
    CrossEntropyBackwardArgs a{grad, logits, labels, lse, grad_loss, ignore_index};
    py::gil_scoped_release nogil;
    cross_entropy_backward_cuda(a, stream);
  });
#endif

  py::class_<Strided4>(m, "Strided4", "A 4-D view whose last dimension is contiguous: element (a, b, c, d) at "
                                      "ptr + (a*s0 + b*s1 + c*s2 + d)*itemsize")
      // The last argument owns the memory (lowrank.attention passes the tensor): held, as Matrix's.
      .def(py::init([](std::uintptr_t ptr, int64_t s0, int64_t s1, int64_t s2, DType dtype, const py::object&) {
             return Strided4{ptr, s0, s1, s2, dtype};
           }),
           py::keep_alive<1, 7>());
  m.def(
      "attention_cpu",
      [](const Strided4& q, const Strided4& k, const Strided4& v, const Strided4& out, std::uintptr_t lse,
         std::vector<int64_t> sizes, float scale, int num_threads, std::uintptr_t kv_range) {
        LOWRANK_CHECK(sizes.size() == 6, "sizes: expected [B, H, KV, T, S, D]");
        AttentionArgs a{q, k, v, out, lse, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], scale, kv_range};
        py::gil_scoped_release nogil;
        attention_cpu(a, num_threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("sizes"), py::arg("scale"),
      py::arg("num_threads"), py::arg("kv_range") = 0,
      "causal grouped-query attention (csrc/attention.h): out and lse (log-sum-exp per query row) from q, k, v; "
      "sizes [B, H, KV, T, S, D]; kv_range: the address of [B, 2] int64 key ranges [start, end) (padding), or 0");
  m.def(
      "attention_backward_cpu",
      [](const Strided4& q, const Strided4& k, const Strided4& v, std::uintptr_t lse, std::vector<int64_t> sizes,
         float scale, const Strided4& dout, const Strided4& dq, const Strided4& dk, const Strided4& dv,
         int num_threads, std::uintptr_t kv_range) {
        LOWRANK_CHECK(sizes.size() == 6, "sizes: expected [B, H, KV, T, S, D]");
        AttentionBackwardArgs a{AttentionArgs{q, k, v, Strided4{}, lse, sizes[0], sizes[1], sizes[2], sizes[3],
                                              sizes[4], sizes[5], scale, kv_range},
                                dout, dq, dk, dv};
        py::gil_scoped_release nogil;
        attention_backward_cpu(a, num_threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lse"), py::arg("sizes"), py::arg("scale"), py::arg("dout"),
      py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("num_threads"), py::arg("kv_range") = 0,
      "the gradients of attention_cpu's out for q, k and v (dq, dk, dv in q's dtype), from q, k, v and lse");
  m.def(
      "rms_norm_cpu",
      [](const Matrix& out, const Matrix& x, const Matrix& weight, const Matrix& rstd, float eps, int num_threads) {
        RMSNormArgs a{out, x, weight, rstd, eps};
        py::gil_scoped_release nogil;
        rms_norm_cpu(a, num_threads);
      },
      py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("eps"), py::arg("num_threads"),
      "RMSNorm (csrc/pointwise.h): out = round(weight * round(x * rstd)), rstd = 1/sqrt(mean(x^2) + eps) per row (fp32)");
  m.def(
      "rms_norm_backward_cpu",
      [](const Matrix& grad_x, const std::optional<Matrix>& grad_weight, const Matrix& grad_y, const Matrix& x,
         const Matrix& weight, const Matrix& rstd, int num_threads) {
        RMSNormBackwardArgs a{grad_x, opt(grad_weight), grad_y, x, weight, rstd};
        py::gil_scoped_release nogil;
        rms_norm_backward_cpu(a, num_threads);
      },
      py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
      py::arg("num_threads"), "the gradients of rms_norm_cpu's out for x and (when grad_weight is given) weight");
  m.def(
      "silu_mul_cpu",
      [](const Matrix& out, const Matrix& gate, const Matrix& up, int num_threads) {
        SiluMulArgs a{out, gate, up};
        py::gil_scoped_release nogil;
        silu_mul_cpu(a, num_threads);
      },
      py::arg("out"), py::arg("gate"), py::arg("up"), py::arg("num_threads"),
      "a gated MLP's SiLU product (csrc/pointwise.h): out = round(round(silu(gate)) * up)");
  m.def(
      "silu_mul_backward_cpu",
      [](const Matrix& grad_gate, const Matrix& grad_up, const Matrix& grad_out, const Matrix& gate, const Matrix& up,
         int num_threads) {
        SiluMulBackwardArgs a{grad_gate, grad_up, grad_out, gate, up};
        py::gil_scoped_release nogil;
        silu_mul_backward_cpu(a, num_threads);
      },
      py::arg("grad_gate"), py::arg("grad_up"), py::arg("grad_out"), py::arg("gate"), py::arg("up"),
      py::arg("num_threads"), "the gradients of silu_mul_cpu's out for gate and up");
  m.def("set_parallel_min_work", &set_parallel_min_work, py::arg("work"),
        "the fewest multiply-adds per thread in the CPU few-token kernels (0: every call takes every thread)");
  m.def("parallel_min_work", &parallel_min_work, "see set_parallel_min_work");
  m.def("supported_cpu_isas", &cpu::supported_isas, "CPU kernel variants this CPU can run");
  m.def("cpu_isa", &cpu::active_isa, "the CPU kernel variant in use");
  m.def("cpu_bf16_dot", &cpu::bf16_dot_available,
        "whether the kernel variant in use has AVX512-BF16 products (nf4_rows_cpu's bf16_dot)");
  m.def("set_cpu_isa", &cpu::set_isa, py::arg("isa"), "force a CPU kernel variant this CPU supports");

  m.def("build_info", [] {
    py::dict d;
    d["version"] = LOWRANK_VERSION;
    d["source_hash"] = LOWRANK_SOURCE_HASH;  // a digest of csrc/ (CMakeLists.txt)
    d["cpu_variants_compiled"] = std::vector<std::string>{"portable", "avx2", "avx512", "avx512bf16"};
#ifdef LOWRANK_WITH_CUDA
    d["cuda_compiled"] = true;
    d["cuda_architectures"] = std::string(LOWRANK_CUDA_ARCHS);
    d["cuda_runtime_version"] = cuda::runtime_version();
    d["cuda_device_count"] = cuda::device_count();
#else
    d["cuda_compiled"] = false;
    d["cuda_architectures"] = std::string();
    d["cuda_runtime_version"] = 0;
    d["cuda_device_count"] = 0;
#endif
    return d;
  });
}
