// <namespace>::launch_stats / launch_stats_reset: which launch sites ran, how often, how many
// emulated threads (the tests check that every launch site of csrc/cuda/*.cu ran).
#include <torch/library.h>

namespace {
const cudaemu::EmuRegistrar stats_ops(
    [](cudaemu::EmuLib& m) {
        m.impl("launch_stats", [] { return ::cudaemu::stats(); });
        m.impl("launch_stats_reset", [] { ::cudaemu::reset_stats(); });
    },
    __FILE__, __LINE__);
}  // namespace
