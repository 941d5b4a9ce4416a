// CUDA helpers shared by the .cu launchers: launch-error checks that become Python exceptions.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lowrank::cuda {

// Raised as RuntimeError in Python (pybind11 maps std::runtime_error).
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("lowrank CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

// Call right after every <<<...>>> launch.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace lowrank::cuda
