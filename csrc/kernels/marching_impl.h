// Per-ray logic of occupancy-grid ray marching, written once for CPU and CUDA.
// Stepping rule: fastdream/ops/marching.py (march_rays_reference); every float is rounded the way the
// chain of PyTorch ops rounds it, so the native kernel emits exactly the reference's samples.
//
// Empty space is skipped by traversing the bitfield instead of looking up every sample: a lookup
// classifies a whole region (the sample's cell, or its whole block of kBlock^3 cells when the coarse
// bitfield says the block is empty), and every later sample whose midpoint lies before the region's
// exit is decided by one comparison. The steps themselves stay a sequential sum like the reference's,
// so the emitted floats are unchanged; only the per-sample grid lookups go.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace march {

constexpr int64_t kBlock = 8;  // cells per coarse block edge

// The fine occupancy bitfield and its coarse summary (a block is set when any of its cells is).
struct OccupancyView {
    const uint8_t* cells;
    const uint8_t* blocks;
    int64_t res[3];
    int64_t block_res[3];
};

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

// Grid cell coordinates of the point o + d * mid, rounded exactly as the reference rounds them.
// Each step (mul, add, sub, div, mul, floor, clamp) is monotone in mid, so along a ray every
// coordinate is monotone in mid too: the region skipping below relies on that.
template <typename S>
FD_HOST_DEVICE FD_INLINE void cell_coords(const S* o, const S* d, S mid, const S* box, const int64_t* res, int64_t* c) {
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        S x = add_rn(o[a], mul_rn(d[a], mid));
        S v = fd_floor(mul_rn(div_rn(sub_rn(x, box[a]), box[6 + a]), static_cast<S>(res[a])));
        S hi = static_cast<S>(res[a] - 1);
        v = v < S(0) ? S(0) : v;   // clamp_min(0) then minimum(res - 1) as the reference does
        v = v > hi ? hi : v;
        c[a] = v == v ? static_cast<int64_t>(v) : 0;
    }
}

FD_HOST_DEVICE FD_INLINE int64_t flat_index(const int64_t* c, const int64_t* res) {
    return (c[0] * res[1] + c[1]) * res[2] + c[2];
}

template <typename S> FD_HOST_DEVICE FD_INLINE S unit_roundoff();
template <> FD_HOST_DEVICE FD_INLINE float unit_roundoff<float>() { return 5.9604645e-8f; }
template <> FD_HOST_DEVICE FD_INLINE double unit_roundoff<double>() { return 1.1102230246251565e-16; }

template <typename S> FD_HOST_DEVICE FD_INLINE S infinity() { return static_cast<S>(HUGE_VAL); }

// The ray's region around a looked-up sample and the last t before which a midpoint is surely still
// inside it. `margin` (per axis, in t) exceeds the rounding error of cell_coords plus that of the face
// time computed here, so a midpoint before the returned bound has rounded coordinates inside the
// region on every axis (they are monotone in mid and were inside at the looked-up sample).
template <typename S>
FD_HOST_DEVICE FD_INLINE S region_exit(const S* o, const S* d, const S* box, const int64_t* lo_cell,
                                       const int64_t* hi_cell, const int64_t* res, const S* margin) {
    S exit = infinity<S>();
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        if (d[a] == S(0)) continue;  // the coordinate never changes along this ray
        const bool up = d[a] > S(0);
        // On the grid's last cell in the travel direction the clamp keeps the coordinate: no exit.
        if (up ? hi_cell[a] == res[a] - 1 : lo_cell[a] == 0) continue;
        const int64_t face = up ? hi_cell[a] + 1 : lo_cell[a];
        S face_x = box[a] + box[6 + a] * static_cast<S>(face) / static_cast<S>(res[a]);
        S t_face = (face_x - o[a]) / d[a] - margin[a];
        exit = t_face < exit ? t_face : exit;
    }
    return exit;
}

struct MarchParams {
    double near, far, step_size, cone_angle, max_step_size;
};

// Walks one ray and calls emit(k, t_start, t_end) for each kept interval, in increasing t. Returns
// the number of kept intervals.
template <typename S, typename Emit>
FD_HOST_DEVICE FD_INLINE int64_t march_ray(const S* o, const S* d, const S* box, const OccupancyView& grid,
                                          const MarchParams& p, Emit& emit) {
    S t_min, t_max;
    ray_aabb(o, d, box, t_min, t_max);
    const S near = static_cast<S>(p.near), far = static_cast<S>(p.far);
    const S step = static_cast<S>(p.step_size), cone = static_cast<S>(p.cone_angle);
    const S max_step = static_cast<S>(p.max_step_size);
    S t = (t_min != t_min) ? t_min : fd_max(t_min, near);   // clamp_min(near), NaN stays NaN
    S t_exit = (t_max != t_max) ? t_max : fd_min(t_max, far);
    if (!(t < t_exit)) return 0;
    // Rounding-error bound of cell_coords along this ray, in t; generous (64 ulps) since it only
    // costs a lookup for midpoints within it of a face.
    S margin[3];
    const S t_abs = fd_max(fd_abs(t), fd_abs(t_exit));
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        S reach = fd_abs(o[a]) + fd_abs(box[a]) + fd_abs(box[3 + a]) + fd_abs(d[a]) * t_abs;
        margin[a] = d[a] == S(0) ? S(0) : S(64) * unit_roundoff<S>() * reach / fd_abs(d[a]);
    }
    int64_t count = 0;
    S known_until = t;  // midpoints below this are known to be in the current region (none yet: mid > t)
    bool occupied = false;
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
        if (!(mid < known_until)) {
            int64_t c[3], lo[3], hi[3];
            cell_coords(o, d, mid, box, grid.res, c);
            occupied = grid.cells[flat_index(c, grid.res)] != 0;
            int64_t b[3] = {c[0] / kBlock, c[1] / kBlock, c[2] / kBlock};
            const bool empty_block = !occupied && grid.blocks[flat_index(b, grid.block_res)] == 0;
            FD_UNROLL
            for (int a = 0; a < 3; ++a) {
                lo[a] = empty_block ? b[a] * kBlock : c[a];
                hi[a] = empty_block ? fd_min(lo[a] + kBlock, grid.res[a]) - 1 : c[a];
            }
            known_until = region_exit(o, d, box, lo, hi, grid.res, margin);
        }
        if (occupied) {
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

// Writes a ray's samples into its slot [base, base + capacity) of the packed outputs. The slot comes
// from a separate count pass; writes past it are dropped, so a count/fill disagreement cannot write
// out of bounds.
template <typename S>
struct WritePacked {
    int64_t ray;
    int64_t base;
    int64_t capacity;
    int64_t* ray_indices;
    S* t_starts;
    S* t_ends;
    FD_HOST_DEVICE FD_INLINE void operator()(int64_t k, S t0, S t1) const {
        if (k >= capacity) return;
        ray_indices[base + k] = ray;
        t_starts[base + k] = t0;
        t_ends[base + k] = t1;
    }
};

// Fixed-capacity buffer (march_rays_fixed): the packed samples fill slots [0, min(total, capacity)); the
// ray whose samples start at `base` keeps the slots of its `count` samples that lie below `capacity`
// (later samples of an overflowing buffer are dropped; the caller reads the total and grows the buffer).
FD_HOST_DEVICE FD_INLINE int64_t slots_within(int64_t base, int64_t count, int64_t capacity) {
    const int64_t room = capacity - base;
    return room <= 0 ? 0 : (room < count ? room : count);
}

// A padding slot: a zero-length interval [0, 0) of the last ray, so the buffer stays grouped by ray and
// the slot gets alpha = 0, weight 0 and no gradient in the compositing kernels.
template <typename S>
FD_HOST_DEVICE FD_INLINE void write_padding(int64_t i, int64_t pad_ray, int64_t* ray_indices, S* t_starts, S* t_ends) {
    ray_indices[i] = pad_ray;
    t_starts[i] = S(0);
    t_ends[i] = S(0);
}

// Occupancy-grid update: non-finite estimates are skipped (a NaN must not poison a cell for good).
template <typename S>
FD_HOST_DEVICE FD_INLINE bool is_finite(S v) {
    return v == v && fd_abs(v) != infinity<S>();
}

// Occupancy-grid update of one visited cell, the same rule on CPU and CUDA: the cell takes an estimate
// above it; a non-finite estimate is skipped (a NaN must not poison a cell for good) and a NaN cell
// stays NaN (as scatter_reduce(amax) in the reference keeps it).
template <typename S>
FD_HOST_DEVICE FD_INLINE bool estimate_raises_cell(S cell, S estimate) {
    return is_finite(estimate) && estimate > cell;
}

}  // namespace march
}  // namespace fastdream
