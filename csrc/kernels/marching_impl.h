// Per-ray logic of occupancy-grid ray marching, written once for CPU and CUDA.
// Stepping rule: fastdream/ops/marching.py (march_rays_reference); every float is rounded the way the
// chain of PyTorch ops rounds it, so the native kernel emits exactly the reference's samples.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace march {

// box = {lo[3], hi[3], size[3]} in the rays' dtype; size = hi - lo as the reference computes it.
template <typename S>
FD_HOST_DEVICE FD_INLINE void ray_aabb(const S* o, const S* d, const S* box, S& t_min, S& t_max) {
    const S eps = static_cast<S>(1e-12);
    S tmin = S(0), tmax = S(0);
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        S da = d[a];
        S safe = fd_abs(da) < eps ? fd_copysign(eps, da) : da;
        S inv = div_rn(S(1), safe);
        S t_lo = mul_rn(sub_rn(box[a], o[a]), inv);
        S t_hi = mul_rn(sub_rn(box[3 + a], o[a]), inv);
        S lo = nan_min(t_lo, t_hi), hi = nan_max(t_lo, t_hi);
        tmin = a == 0 ? lo : nan_max(tmin, lo);
        tmax = a == 0 ? hi : nan_min(tmax, hi);
    }
    t_min = tmin;
    t_max = tmax;
}

// Grid cell (flat index into the contiguous (X, Y, Z) grid) holding the point o + d * mid.
template <typename S>
FD_HOST_DEVICE FD_INLINE int64_t cell_of(const S* o, const S* d, S mid, const S* box, const int64_t* res) {
    int64_t c[3];
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        S x = add_rn(o[a], mul_rn(d[a], mid));
        S v = fd_floor(mul_rn(div_rn(sub_rn(x, box[a]), box[6 + a]), static_cast<S>(res[a])));
        S hi = static_cast<S>(res[a] - 1);
        v = v < S(0) ? S(0) : v;   // clamp_min(0) then minimum(res - 1) as the reference does
        v = v > hi ? hi : v;
        c[a] = v == v ? static_cast<int64_t>(v) : 0;
    }
    return (c[0] * res[1] + c[1]) * res[2] + c[2];
}

struct MarchParams {
    double near, far, step_size, cone_angle, max_step_size;
};

// Walks one ray and calls emit(t_start, t_end) for each kept interval, in increasing t. Returns the
// number of kept intervals. Consecutive steps that land in the same cell reuse its occupancy bit.
template <typename S, typename Emit>
FD_HOST_DEVICE FD_INLINE int64_t march_ray(const S* o, const S* d, const S* box, const uint8_t* grid,
                                          const int64_t* res, const MarchParams& p, Emit& emit) {
    S t_min, t_max;
    ray_aabb(o, d, box, t_min, t_max);
    const S near = static_cast<S>(p.near), far = static_cast<S>(p.far);
    const S step = static_cast<S>(p.step_size), cone = static_cast<S>(p.cone_angle);
    const S max_step = static_cast<S>(p.max_step_size);
    S t = (t_min != t_min) ? t_min : fd_max(t_min, near);   // clamp_min(near), NaN stays NaN
    S t_exit = (t_max != t_max) ? t_max : fd_min(t_max, far);
    int64_t count = 0;
    int64_t last_cell = -1;
    bool last_occ = false;
    while (t < t_exit) {
        S dt = step;
        if (p.cone_angle > 0) {
            dt = mul_rn(t, cone);
            dt = dt < step ? step : dt;        // clamp(min=step_size, max=max_step_size)
            dt = dt > max_step ? max_step : dt;
        }
        S t_next = add_rn(t, dt);
        S t_end = nan_min(t_next, t_exit);
        S mid = mul_rn(add_rn(t, t_end), static_cast<S>(0.5));
        int64_t cell = cell_of(o, d, mid, box, res);
        if (cell != last_cell) {
            last_cell = cell;
            last_occ = grid[cell] != 0;
        }
        if (last_occ) {
            emit(count, t, t_end);
            ++count;
        }
        if (!(t_next > t)) break;  // float stagnation: the reference would loop forever
        t = t_next;
    }
    return count;
}

struct CountOnly {
    FD_HOST_DEVICE FD_INLINE void operator()(int64_t, double, double) const {}
    FD_HOST_DEVICE FD_INLINE void operator()(int64_t, float, float) const {}
};

template <typename S>
struct WritePacked {
    int64_t ray;
    int64_t base;
    int64_t* ray_indices;
    S* t_starts;
    S* t_ends;
    FD_HOST_DEVICE FD_INLINE void operator()(int64_t k, S t0, S t1) const {
        ray_indices[base + k] = ray;
        t_starts[base + k] = t0;
        t_ends[base + k] = t1;
    }
};

// Occupancy-grid update: EMA of the max density per cell, then threshold.
template <typename S>
FD_HOST_DEVICE FD_INLINE S ema_max(S density, S decay, S fresh) {
    S decayed = mul_rn(density, decay);
    return decayed > fresh ? decayed : fresh;
}

}  // namespace march
}  // namespace fastdream
