// Per-point logic around the field's MLP, written once for CPU and CUDA (twins: fastdream/ops/field_head.py):
// the sample points of packed ray intervals, the hash-grid input of a point and its finite-difference probes,
// and the output head that turns the MLP's raw (density, albedo) into density, albedo and unit normals, with
// its backward. A point's probes are, in this order, the point itself and the point moved by `step` along
// +x +y +z -x -y -z (K = 7); K = 1 is the point alone.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace field {

constexpr int kProbes = 7;
enum BlobShape : int { kNoBlob = 0, kLinearBlob = 1, kGaussianBlob = 2 };
enum Activation : int { kTruncExp = 0, kSoftplus = 1 };
constexpr double kExpClamp = 15.0;         // instant-ngp's truncated exp: forward exp(min(pre, 15))
constexpr double kSoftplusThreshold = 20;  // torch's softplus: linear above it

FD_HOST_DEVICE FD_INLINE float fd_log1p(float v) { return log1pf(v); }
FD_HOST_DEVICE FD_INLINE double fd_log1p(double v) { return log1p(v); }

// Offset of probe k (< 7) along axis a: 0, or +-step on the probe's axis.
template <typename S>
FD_HOST_DEVICE FD_INLINE S probe_offset(int k, int a, S step) {
    if (k == 0 || (k - 1) % 3 != a) return S(0);
    return k <= 3 ? step : -step;
}

// Midpoint of sample i's interval on its ray: origin + direction * ((t_start + t_end) * 0.5).
template <typename S>
FD_HOST_DEVICE FD_INLINE void ray_point(int64_t i, const S* origins, const S* directions, const int64_t* ray_indices,
                                        const S* t_starts, const S* t_ends, S* out) {
    const int64_t r = ray_indices[i];
    const S t = (t_starts[i] + t_ends[i]) * S(0.5);
    FD_UNROLL
    for (int a = 0; a < 3; ++a) out[3 * i + a] = origins[3 * r + a] + directions[3 * r + a] * t;
}

// Hash-grid input of probe k of point i (row i * K + k): clamp((x + offset) * unit_scale + unit_offset, 0, 1).
template <typename S>
FD_HOST_DEVICE FD_INLINE void probe_unit_point(int64_t i, int k, int K, const S* x, const S* unit_scale,
                                               const S* unit_offset, S step, S* out) {
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        const S p = x[3 * i + a] + probe_offset(k, a, step);
        out[3 * (i * K + k) + a] = fd_min(fd_max(p * unit_scale[a] + unit_offset[a], S(0)), S(1));
    }
}

template <typename S>
struct HeadParams {
    const S* centre;   // (3) box centre, the blob's (device memory: read in the kernel)
    S step;            // probe step (K = 7)
    S density_bias;    // added to every pre-activation density
    S blob_density;    // at the centre; 0: no blob
    S blob_slope;      // linear blob: -blob_density / radius
    S blob_two_r2;     // gaussian blob: 2 radius^2
    S normal_eps;      // F.normalize's eps for the probe difference
    int blob_shape, activation, K;
};

// Pre-activation density of probe k of point i from its raw MLP output.
template <typename S>
FD_HOST_DEVICE FD_INLINE S pre_density(const HeadParams<S>& p, S raw, const S* x, int64_t i, int k) {
    S pre = raw;
    if (p.density_bias != S(0)) pre = pre + p.density_bias;
    if (p.blob_shape == kNoBlob) return pre;
    const S dx = x[3 * i] + probe_offset(k, 0, p.step) - p.centre[0];
    const S dy = x[3 * i + 1] + probe_offset(k, 1, p.step) - p.centre[1];
    const S dz = x[3 * i + 2] + probe_offset(k, 2, p.step) - p.centre[2];
    const S r2 = dx * dx + dy * dy + dz * dz;
    if (p.blob_shape == kLinearBlob) return (pre + fd_sqrt(r2) * p.blob_slope) + p.blob_density;
    return pre + p.blob_density * fd_exp(-r2 / p.blob_two_r2);
}

template <typename S>
FD_HOST_DEVICE FD_INLINE S activate(const HeadParams<S>& p, S pre) {
    if (p.activation == kTruncExp) return fd_exp(fd_min(pre, S(kExpClamp)));
    return pre > S(kSoftplusThreshold) ? pre : fd_log1p(fd_exp(pre));
}

// d sigma / d pre as the Python twin's autograd has it: the truncated exp passes no gradient at or above the
// clamp (clamp_max) and its gradient exp(pre) is clamped below at exp(-15) (TruncExp).
template <typename S>
FD_HOST_DEVICE FD_INLINE S activation_grad(const HeadParams<S>& p, S pre) {
    if (p.activation == kTruncExp)
        return pre < S(kExpClamp) ? fd_exp(fd_max(pre, S(-kExpClamp))) : S(0);
    if (pre > S(kSoftplusThreshold)) return S(1);
    const S z = fd_exp(pre);
    return z / (z + S(1));
}

template <typename S>
FD_HOST_DEVICE FD_INLINE S sigmoid(S v) { return S(1) / (S(1) + fd_exp(-v)); }

// Point i: sigma[i]; albedo (3) if asked; for K = 7 the unit normal normalize(sigma(-probes) - sigma(+probes)).
template <typename S>
FD_HOST_DEVICE FD_INLINE void head_forward(const HeadParams<S>& p, int64_t i, const S* raw, const S* x, S* sigma,
                                           S* albedo, S* normals) {
    const S* r = raw + 4 * p.K * i;
    sigma[i] = activate(p, pre_density(p, r[0], x, i, 0));
    if (albedo != nullptr) {
        FD_UNROLL
        for (int c = 0; c < 3; ++c) albedo[3 * i + c] = sigmoid(r[1 + c]);
    }
    if (p.K == kProbes && normals != nullptr) {
        S v[3], norm2 = S(0);
        FD_UNROLL
        for (int a = 0; a < 3; ++a) {
            const S plus = activate(p, pre_density(p, r[4 * (1 + a)], x, i, 1 + a));
            const S minus = activate(p, pre_density(p, r[4 * (4 + a)], x, i, 4 + a));
            v[a] = minus - plus;
            norm2 += v[a] * v[a];
        }
        const S d = fd_max(fd_sqrt(norm2), p.normal_eps);
        FD_UNROLL
        for (int a = 0; a < 3; ++a) normals[3 * i + a] = v[a] / d;
    }
}

// Gradient w.r.t. raw (rows i*K .. i*K+K-1, four values each) from those of sigma, albedo and normals (any of
// them null: zero).
template <typename S>
FD_HOST_DEVICE FD_INLINE void head_backward(const HeadParams<S>& p, int64_t i, const S* g_sigma, const S* g_albedo,
                                            const S* g_normals, const S* raw, const S* x, S* g_raw) {
    const S* r = raw + 4 * p.K * i;
    S* g = g_raw + 4 * p.K * i;
    for (int j = 0; j < 4 * p.K; ++j) g[j] = S(0);
    if (g_sigma != nullptr) g[0] = g_sigma[i] * activation_grad(p, pre_density(p, r[0], x, i, 0));
    if (g_albedo != nullptr) {
        FD_UNROLL
        for (int c = 0; c < 3; ++c) {
            const S s = sigmoid(r[1 + c]);
            g[1 + c] = g_albedo[3 * i + c] * (S(1) - s) * s;
        }
    }
    if (p.K != kProbes || g_normals == nullptr) return;
    S pre[6], v[3], norm2 = S(0);
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        pre[a] = pre_density(p, r[4 * (1 + a)], x, i, 1 + a);
        pre[3 + a] = pre_density(p, r[4 * (4 + a)], x, i, 4 + a);
        v[a] = activate(p, pre[3 + a]) - activate(p, pre[a]);
        norm2 += v[a] * v[a];
    }
    // n = v / max(|v|, eps): above eps dn/dv = (I - n n^T) / |v|, below it 1 / eps (clamp_min passes nothing).
    const S norm = fd_sqrt(norm2);
    const S* gn = g_normals + 3 * i;
    S gv[3];
    if (norm > p.normal_eps) {
        const S dot = (gn[0] * v[0] + gn[1] * v[1] + gn[2] * v[2]) / norm;
        FD_UNROLL
        for (int a = 0; a < 3; ++a) gv[a] = (gn[a] - v[a] / norm * dot) / norm;
    } else {
        FD_UNROLL
        for (int a = 0; a < 3; ++a) gv[a] = gn[a] / p.normal_eps;
    }
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        g[4 * (1 + a)] = -gv[a] * activation_grad(p, pre[a]);
        g[4 * (4 + a)] = gv[a] * activation_grad(p, pre[3 + a]);
    }
}

}  // namespace field
}  // namespace fastdream
