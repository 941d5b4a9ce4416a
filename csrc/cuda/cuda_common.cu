// Device queries for lowrank.info(); safe without a GPU or driver (errors mean "no device").
#include <cuda_runtime.h>

namespace lowrank::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace lowrank::cuda
