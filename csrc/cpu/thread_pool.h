// A small persistent thread pool for the CPU kernels. The caller passes the thread count torch
// uses (torch.get_num_threads()), so lowrank never runs more threads than torch would: our
// kernels run between torch ops, never beside them. The calling thread does work too.
#pragma once
#include <cstdint>

namespace lowrank::cpu {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for every t in [0, n_tasks), on up to num_threads threads. Tasks are handed out
// dynamically (an atomic counter), so uneven tasks balance. Concurrent callers are serialized.
void parallel_for(int64_t n_tasks, int num_threads, TaskFn fn, void* ctx);

}  // namespace lowrank::cpu
