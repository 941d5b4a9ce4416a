// Parallel loops for the CPU kernels, on the OpenMP runtime torch itself uses (parallel_for.cpp).
// The caller passes the thread count torch uses (torch.get_num_threads()), so lowrank never runs
// more threads than torch would: our kernels run between torch ops, on the same threads.
#pragma once
#include <cstdint>

namespace lowrank::cpu {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for every t in [0, n_tasks), on up to num_threads threads. Tasks are handed out
// dynamically, so uneven tasks balance.
void parallel_for(int64_t n_tasks, int num_threads, TaskFn fn, void* ctx);

}  // namespace lowrank::cpu
