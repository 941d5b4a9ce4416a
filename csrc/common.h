// Types shared by every launcher: a dtype tag, a strided row-major matrix view, and the error
// helper that turns bad arguments into Python ValueErrors (pybind11 maps std::invalid_argument).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lowrank {

enum class DType : int { float32 = 0, bfloat16 = 1, float16 = 2, uint8 = 3, int32 = 4, int64 = 5 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::float32: return "float32";
    case DType::bfloat16: return "bfloat16";
    case DType::float16: return "float16";
    case DType::uint8: return "uint8";
    case DType::int32: return "int32";
    case DType::int64: return "int64";
  }
  return "?";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::float32: return 4;
    case DType::bfloat16: return 2;
    case DType::float16: return 2;
    case DType::uint8: return 1;
    case DType::int32: return 4;
    case DType::int64: return 8;
  }
  return 0;
}

// A row-major matrix view: element (i, j) lives at ptr + (i * ld + j) * dtype_size(dtype).
// ld ("leading dimension") lets kernels read slices such as VeRA's A[:r, :in] without copies.
struct Matrix {
  std::uintptr_t ptr = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;
  DType dtype = DType::float32;
  int device = -1;  // -1: CPU, >= 0: CUDA device index

  template <class T>
  T* data() const { return reinterpret_cast<T*>(ptr); }
};

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// LOWRANK_CHECK(ok, message): throws std::invalid_argument(message) unless ok. A macro so the message,
// usually a few string concatenations, is built only on failure: these checks run on every kernel
// call, and building their messages eagerly cost microseconds per call.
#define LOWRANK_CHECK(ok, ...)                        \
  do {                                                \
    if (!(ok)) ::lowrank::fail(__VA_ARGS__);          \
  } while (0)

// No view spans more elements than this (2^48: far past any machine's memory), so index
// arithmetic in int64 (i * ld + j, rows * cols, times the element size) can never overflow.
constexpr int64_t kMaxElements = int64_t(1) << 48;

// rows x cols elements, strided by ld, fit under kMaxElements (checked without overflowing).
inline bool extent_fits(int64_t rows, int64_t cols, int64_t ld) {
  if (rows < 0 || cols < 0 || ld < 0) return false;
  if (rows == 0 || cols == 0) return true;
  if (rows > 1 && ld < cols) return false;  // overlapping rows (and no division by a zero ld below)
  if (cols > kMaxElements || (rows > 1 && ld > kMaxElements)) return false;
  return rows - 1 <= (kMaxElements - cols) / (rows > 1 ? ld : 1);
}

// Re-checks what the Python validation helper already checked; the binding is the last line
// before raw pointers, so it never trusts its caller.
inline void check_matrix(const Matrix& m, const char* name, int64_t rows, int64_t cols) {
  LOWRANK_CHECK(m.rows == rows && m.cols == cols,
        std::string(name) + ": expected shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
            "], got [" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "]");
  LOWRANK_CHECK(m.ld >= m.cols || m.rows <= 1,
        std::string(name) + ": leading dimension " + std::to_string(m.ld) + " is smaller than its " +
            std::to_string(m.cols) + " columns");
  LOWRANK_CHECK(extent_fits(m.rows, m.cols, m.ld),
        std::string(name) + ": " + std::to_string(m.rows) + " rows of leading dimension " + std::to_string(m.ld) +
            " span more than 2^48 elements");
  LOWRANK_CHECK(m.ptr != 0 || m.rows == 0 || m.cols == 0, std::string(name) + ": null data pointer");
}

}  // namespace lowrank
