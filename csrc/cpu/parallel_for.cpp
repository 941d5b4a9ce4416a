// parallel_for on OpenMP. The module links libgomp by its SONAME (libgomp.so.1), and torch, imported
// first (lowrank/__init__.py), has already loaded its own libgomp.so.1: the dynamic loader reuses it,
// so our parallel regions run on torch's own OpenMP thread team. That matters: after each torch op its
// workers spin for a while waiting for more work, and a separate pool of ours would compete with them
// for the same cores (measured: a bf16 M=1 forward right after nn.Linear took 6.2 ms with a private
// pool vs 3.9 ms with OMP_WAIT_POLICY=passive); with one team, those spinning threads do our work.
#include "cpu/parallel_for.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lowrank::cpu {

void parallel_for(int64_t n_tasks, int num_threads, TaskFn fn, void* ctx) {
  if (n_tasks <= 0) return;
  const int threads = int(num_threads < n_tasks ? num_threads : n_tasks);
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
    return;
  }
#endif
  for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
}

}  // namespace lowrank::cpu
