// Gradient-free pruning of marched samples (nerfacc's visibility test), per ray, written once for CPU and
// CUDA: walk a ray's samples front to back accumulating the transmittance with the arithmetic of
// render::weights_forward_ray (so the decisions equal a render_weights pass), stop at the first sample
// whose transmittance is below early_stop_eps (early ray termination: every later sample is below it too,
// densities being >= 0), and keep the samples whose alpha reaches alpha_threshold.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace prune {

// First index in [lo, hi) whose ray index is >= r (ray indices non-decreasing): rays find their samples
// with no offsets array.
FD_HOST_DEVICE FD_INLINE int64_t lower_bound(const int64_t* ray_indices, int64_t lo, int64_t hi, int64_t r) {
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (ray_indices[mid] < r) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Calls keep(i) for each kept sample of [begin, end) in order; returns how many.
template <typename S, typename Keep>
FD_HOST_DEVICE FD_INLINE int64_t walk_ray(int64_t begin, int64_t end, const S* t_starts, const S* t_ends,
                                          const S* sigmas, S early_stop_eps, S alpha_threshold, Keep&& keep) {
    S acc = S(0);
    int64_t kept = 0;
    for (int64_t i = begin; i < end; ++i) {
        const S T = fd_exp(-acc);
        if (!(T >= early_stop_eps)) break;  // also stops at a NaN transmittance, which the test rejects too
        const S s = sigmas[i] * (t_ends[i] - t_starts[i]);
        const S alpha = S(1) - fd_exp(-s);
        if (alpha >= alpha_threshold) {
            keep(i);
            ++kept;
        }
        acc += s;
    }
    return kept;
}

struct CountOnly {
    FD_HOST_DEVICE FD_INLINE void operator()(int64_t) const {}
};

// Copies kept sample i to the next output slot, below the capacity (the outputs are cut there).
template <typename S>
struct WriteKept {
    int64_t slot, capacity;
    const int64_t* ray_indices;
    const S *t_starts, *t_ends;
    int64_t* out_rays;
    S *out_starts, *out_ends;
    FD_HOST_DEVICE FD_INLINE void operator()(int64_t i) {
        if (slot < capacity) {
            out_rays[slot] = ray_indices[i];
            out_starts[slot] = t_starts[i];
            out_ends[slot] = t_ends[i];
        }
        ++slot;
    }
};

}  // namespace prune
}  // namespace fastdream
