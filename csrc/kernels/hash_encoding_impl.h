// Per-(point, level) logic of the multiresolution hash encoding, written once for CPU and CUDA.
// Semantics: fastdream/ops/hash_encoding.py (tiny-cuda-nn's 3D HashGrid, linear interpolation).
// No torch header here: the ctest executable in csrc/tests includes this file on its own.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace hashgrid {

constexpr int kMaxLevels = 32;
constexpr uint32_t kPrime1 = 2654435761u;
constexpr uint32_t kPrime2 = 805459861u;

// Small, passed by value to CUDA kernels (fits easily in the 4 KiB parameter space).
struct GridMeta {
    int n_levels;
    int n_features;
    float scale[kMaxLevels];         // float32 values, as tcnn computes them
    uint32_t resolution[kMaxLevels];  // vertices per axis
    uint32_t size[kMaxLevels];        // feature vectors in the level's table
    int64_t offset[kMaxLevels];       // first feature vector of the level
    uint8_t hashed[kMaxLevels];
};

// tcnn's grid_index: XOR hash of coords times primes (uint32 wrap-around), or dense x + y*r + z*r^2,
// either way modulo the table size.
FD_HOST_DEVICE FD_INLINE uint32_t grid_index(uint32_t cx, uint32_t cy, uint32_t cz, uint32_t resolution,
                                            uint32_t size, bool hashed) {
    uint32_t h;
    if (hashed) {
        h = cx ^ (cy * kPrime1) ^ (cz * kPrime2);
    } else {
        h = cx + cy * resolution + cz * resolution * resolution;
    }
    return h % size;
}

// Position of a point inside one level: the integer base corner and the fractional offset.
// pos = x * scale + 0.5 rounded twice (no FMA), exactly like the reference.
template <typename S>
struct LevelPos {
    uint32_t base[3];
    S frac[3];
};

template <typename S>
FD_HOST_DEVICE FD_INLINE LevelPos<S> level_pos(const S* x, float scale) {
    LevelPos<S> p;
FD_UNROLL
    for (int d = 0; d < 3; ++d) {
        S pos = add_rn(mul_rn(x[d], static_cast<S>(scale)), static_cast<S>(0.5));
        S fl = fd_floor(pos);
        p.frac[d] = sub_rn(pos, fl);
        p.base[d] = static_cast<uint32_t>(static_cast<int64_t>(fl));
    }
    return p;
}

// Corner c (0..7) has offset bit d = (c >> d) & 1 along axis d, like the reference's corner order.
template <typename S>
FD_HOST_DEVICE FD_INLINE S corner_weight(const LevelPos<S>& p, int c) {
    S w = ((c & 1) ? p.frac[0] : S(1) - p.frac[0]);
    w = w * ((c & 2) ? p.frac[1] : S(1) - p.frac[1]);
    w = w * ((c & 4) ? p.frac[2] : S(1) - p.frac[2]);
    return w;
}

// Corner c's interpolation factor along each axis (frac or 1 - frac) and its derivative sign (+1 / -1).
template <typename S>
FD_HOST_DEVICE FD_INLINE void corner_factors(const LevelPos<S>& p, int c, S* w, S* s) {
FD_UNROLL
    for (int d = 0; d < 3; ++d) {
        bool up = (c >> d) & 1;
        w[d] = up ? p.frac[d] : S(1) - p.frac[d];
        s[d] = up ? S(1) : S(-1);
    }
}

// d weight / d frac_d for corner c.
template <typename S>
FD_HOST_DEVICE FD_INLINE void corner_weight_grad(const LevelPos<S>& p, int c, S* dw) {
    S w[3], s[3];
    corner_factors(p, c, w, s);
    dw[0] = s[0] * w[1] * w[2];
    dw[1] = s[1] * w[0] * w[2];
    dw[2] = s[2] * w[0] * w[1];
}

// Second derivatives d2 w / (d frac_d d frac_e), d != e: sign_d * sign_e * w_other. Indexed by the
// missing axis: h[0] = d2w/(d1 d2), h[1] = d2w/(d0 d2), h[2] = d2w/(d0 d1).
template <typename S>
FD_HOST_DEVICE FD_INLINE void corner_weight_hess(const LevelPos<S>& p, int c, S* h) {
    S w[3], s[3];
    corner_factors(p, c, w, s);
    h[0] = s[1] * s[2] * w[0];
    h[1] = s[0] * s[2] * w[1];
    h[2] = s[0] * s[1] * w[2];
}

template <typename S>
FD_HOST_DEVICE FD_INLINE uint32_t corner_index(const GridMeta& m, int level, const LevelPos<S>& p, int c) {
    return grid_index(p.base[0] + (c & 1), p.base[1] + ((c >> 1) & 1), p.base[2] + ((c >> 2) & 1),
                      m.resolution[level], m.size[level], m.hashed[level] != 0);
}

// Forward for one (point, level): out[f] = sum_c w_c * table[idx_c, f].
template <int NF = 0, typename S, typename P>
FD_HOST_DEVICE FD_INLINE void encode_level(const GridMeta& m, int level, const S* x, const P* params, S* out) {
    const int F = NF > 0 ? NF : m.n_features;
    for (int f = 0; f < F; ++f) out[f] = S(0);
    LevelPos<S> p = level_pos(x, m.scale[level]);
    const P* table = params + m.offset[level] * F;
FD_UNROLL
    for (int c = 0; c < 8; ++c) {
        S w = corner_weight(p, c);
        const P* v = table + static_cast<int64_t>(corner_index(m, level, p, c)) * F;
        for (int f = 0; f < F; ++f) out[f] += w * static_cast<S>(v[f]);
    }
}

// Params gradient for one (point, level): grad_table[idx_c, f] += w_c * gy[f]. `acc(index, value)`
// adds into the gradient buffer (plain add on CPU with a race-free partition, atomics on CUDA).
template <int NF = 0, typename S, typename Acc>
FD_HOST_DEVICE FD_INLINE void encode_level_backward_params(const GridMeta& m, int level, const S* x, const S* gy,
                                                          Acc& acc) {
    const int F = NF > 0 ? NF : m.n_features;
    LevelPos<S> p = level_pos(x, m.scale[level]);
    const int64_t base = m.offset[level] * F;
FD_UNROLL
    for (int c = 0; c < 8; ++c) {
        S w = corner_weight(p, c);
        int64_t i = base + static_cast<int64_t>(corner_index(m, level, p, c)) * F;
        acc(i, w, gy, F);
    }
}

// Input gradient contribution of one level: gx[d] += scale * sum_c dw_c/dfrac_d * <gy, table[idx_c]>.
template <int NF = 0, typename S, typename P>
FD_HOST_DEVICE FD_INLINE void encode_level_backward_x(const GridMeta& m, int level, const S* x, const S* gy,
                                                     const P* params, S* gx) {
    const int F = NF > 0 ? NF : m.n_features;
    LevelPos<S> p = level_pos(x, m.scale[level]);
    const P* table = params + m.offset[level] * F;
    S g[3] = {S(0), S(0), S(0)};
FD_UNROLL
    for (int c = 0; c < 8; ++c) {
        const P* v = table + static_cast<int64_t>(corner_index(m, level, p, c)) * F;
        S dot = S(0);
        for (int f = 0; f < F; ++f) dot += gy[f] * static_cast<S>(v[f]);
        S dw[3];
        corner_weight_grad(p, c, dw);
        g[0] += dw[0] * dot;
        g[1] += dw[1] * dot;
        g[2] += dw[2] * dot;
    }
    const S scale = static_cast<S>(m.scale[level]);
    gx[0] += scale * g[0];
    gx[1] += scale * g[1];
    gx[2] += scale * g[2];
}

// Double backward of one level. The first backward maps (gy, params, x) -> gx (dL/dx). Given ggx
// (the gradient flowing into gx), produce:
//   ggy[f]            = scale * sum_c (ggx . dw_c) * table[idx_c, f]           (written, per level)
//   grad_table[idx_c] += scale * (ggx . dw_c) * gy                              (via acc, if given)
//   gx2[e]           += scale^2 * sum_c sum_{d!=e} ggx_d * d2w_c/(dd de) * <gy, table[idx_c]>
template <int NF = 0, typename S, typename P, typename Acc>
FD_HOST_DEVICE FD_INLINE void encode_level_backward_backward(const GridMeta& m, int level, const S* x, const S* gy,
                                                            const S* ggx, const P* params, S* ggy, S* gx2,
                                                            Acc* acc) {
    const int F = NF > 0 ? NF : m.n_features;
    LevelPos<S> p = level_pos(x, m.scale[level]);
    const P* table = params + m.offset[level] * F;
    const S scale = static_cast<S>(m.scale[level]);
    for (int f = 0; f < F; ++f) ggy[f] = S(0);
    S g2[3] = {S(0), S(0), S(0)};
FD_UNROLL
    for (int c = 0; c < 8; ++c) {
        int64_t idx = static_cast<int64_t>(corner_index(m, level, p, c));
        const P* v = table + idx * F;
        S dw[3], h[3];
        corner_weight_grad(p, c, dw);
        corner_weight_hess(p, c, h);
        S a = scale * (ggx[0] * dw[0] + ggx[1] * dw[1] + ggx[2] * dw[2]);
        S dot = S(0);
        for (int f = 0; f < F; ++f) {
            S vf = static_cast<S>(v[f]);
            ggy[f] += a * vf;
            dot += gy[f] * vf;
        }
        if (acc) (*acc)(m.offset[level] * F + idx * F, a, gy, F);
        // e = 0: d in {1, 2}; e = 1: d in {0, 2}; e = 2: d in {0, 1}
        g2[0] += (ggx[1] * h[2] + ggx[2] * h[1]) * dot;
        g2[1] += (ggx[0] * h[2] + ggx[2] * h[0]) * dot;
        g2[2] += (ggx[0] * h[1] + ggx[1] * h[0]) * dot;
    }
    const S s2 = scale * scale;
    gx2[0] += s2 * g2[0];
    gx2[1] += s2 * g2[1];
    gx2[2] += s2 * g2[2];
}

// Calls body with a compile-time constant kF equal to n_features (1, 2, 4 or 8) so the per-feature
// loops unroll and the feature buffers stay in registers on the GPU.
#define FD_DISPATCH_N_FEATURES(n_features, ...)                      \
    [&] {                                                            \
        switch (n_features) {                                        \
            case 1: { constexpr int kF = 1; return __VA_ARGS__(); }  \
            case 2: { constexpr int kF = 2; return __VA_ARGS__(); }  \
            case 4: { constexpr int kF = 4; return __VA_ARGS__(); }  \
            default: { constexpr int kF = 8; return __VA_ARGS__(); } \
        }                                                            \
    }()

}  // namespace hashgrid
}  // namespace fastdream
