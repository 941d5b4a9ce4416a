// Mixed-adapter rows on CUDA (see mixed.h). Placeholder until the kernels land.
#include <stdexcept>

#include "cuda/cuda_common.h"
#include "mixed.h"

namespace lowrank {
void mixed_rows_cuda(const MixedRowsArgs& a, std::uintptr_t stream) {
  validate_mixed_rows(a, /*cuda=*/true);
  (void)stream;
  throw std::runtime_error("mixed_rows_cuda: not built yet");
}
}  // namespace lowrank
