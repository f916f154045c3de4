// Per-ray volume rendering on packed samples, written once for CPU and CUDA.
// Conventions (nerfacc, fastdream/ops/volume_rendering.py): alpha = 1 - exp(-sigma * dt), exclusive
// transmittance T_i = exp(-sum_{j<i} sigma_j dt_j), weight = T * alpha. Shading: ops/shading.py.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace render {

enum ShadingMode : int { kAlbedo = 0, kLambertian = 1, kTextureless = 2 };

// ---------------------------------------------------------------- render_weights (per ray)
template <typename S>
FD_HOST_DEVICE FD_INLINE void weights_forward_ray(int64_t begin, int64_t end, const S* t_starts, const S* t_ends,
                                                  const S* sigmas, S* weights, S* trans, S* alphas) {
    S acc = S(0);
    for (int64_t i = begin; i < end; ++i) {
        S s = sigmas[i] * (t_ends[i] - t_starts[i]);
        S alpha = S(1) - fd_exp(-s);
        S T = fd_exp(-acc);
        weights[i] = T * alpha;
        trans[i] = T;
        alphas[i] = alpha;
        acc += s;
    }
}

// Gradient w.r.t. s_i = sigma_i * dt_i given upstream grads of (weights, transmittance, alphas) and the
// forward's transmittance/alphas. dL/ds_k = (gA_k + gW_k T_k) e^{-s_k} - sum_{i>k} T_i (gT_i + gW_i a_i),
// the suffix sum is carried walking the ray backwards (no cancellation).
template <typename S>
FD_HOST_DEVICE FD_INLINE void weights_backward_ray(int64_t begin, int64_t end, const S* t_starts, const S* t_ends,
                                                   const S* sigmas, const S* trans, const S* alphas, const S* gw,
                                                   const S* gt, const S* ga, S* grad_s) {
    S suffix = S(0);
    for (int64_t i = end - 1; i >= begin; --i) {
        S s = sigmas[i] * (t_ends[i] - t_starts[i]);
        S T = trans[i], a = alphas[i];
        S gwi = gw ? gw[i] : S(0), gti = gt ? gt[i] : S(0), gai = ga ? ga[i] : S(0);
        grad_s[i] = (gai + gwi * T) * fd_exp(-s) - suffix;
        suffix += T * (gti + gwi * a);
    }
}

// ---------------------------------------------------------------- shading (per sample)
template <typename S>
struct ShadeInputs {
    const S* origin;     // ray origin (3)
    const S* direction;  // ray direction (3)
    const S* light;      // light position (3)
    S intensity;
    S ambient;
};

// Unit vector from the sample to the light, and the Lambert term max(0, n . l).
template <typename S>
FD_HOST_DEVICE FD_INLINE S light_dir(const ShadeInputs<S>& in, S t_mid, const S* n, S* l) {
    S norm2 = S(0);
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        S pos = in.origin[a] + in.direction[a] * t_mid;
        l[a] = in.light[a] - pos;
        norm2 += l[a] * l[a];
    }
    S norm = fd_sqrt(norm2);
    norm = norm < S(1e-12) ? S(1e-12) : norm;
    S dot = S(0);
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        l[a] = l[a] / norm;
        dot += n[a] * l[a];
    }
    return dot;
}

template <typename S>
FD_HOST_DEVICE FD_INLINE void shade(int mode, const S* albedo, const S* n, const ShadeInputs<S>& in, S t_mid, S* c) {
    if (mode == kAlbedo) {
        c[0] = albedo[0]; c[1] = albedo[1]; c[2] = albedo[2];
        return;
    }
    S l[3];
    S dot = light_dir(in, t_mid, n, l);
    S lambert = dot > S(0) ? dot : S(0);
    S I = in.intensity * lambert + in.ambient;
    if (mode == kTextureless) {
        c[0] = I; c[1] = I; c[2] = I;
    } else {
        c[0] = albedo[0] * I; c[1] = albedo[1] * I; c[2] = albedo[2] * I;
    }
}

// ---------------------------------------------------------------- fused composite (per ray)
// out: rgb[3], opacity, depth, normal[3]. weights[i] is written per sample (a returned output).
template <typename S>
FD_HOST_DEVICE FD_INLINE void composite_forward_ray(int64_t begin, int64_t end, int mode, const S* t_starts,
                                                    const S* t_ends, const S* sigmas, const S* albedo,
                                                    const S* normals, const ShadeInputs<S>& in, S* rgb, S* opacity,
                                                    S* depth, S* normal, S* weights) {
    S acc = S(0), op = S(0), dep = S(0);
    S col[3] = {S(0), S(0), S(0)}, nrm[3] = {S(0), S(0), S(0)};
    for (int64_t i = begin; i < end; ++i) {
        S s = sigmas[i] * (t_ends[i] - t_starts[i]);
        S alpha = S(1) - fd_exp(-s);
        S w = fd_exp(-acc) * alpha;
        acc += s;
        weights[i] = w;
        S t_mid = (t_starts[i] + t_ends[i]) * S(0.5);
        S c[3];
        shade(mode, albedo + 3 * i, normals ? normals + 3 * i : nullptr, in, t_mid, c);
        FD_UNROLL
        for (int a = 0; a < 3; ++a) col[a] += w * c[a];
        op += w;
        dep += w * t_mid;
        if (normals) {
            FD_UNROLL
            for (int a = 0; a < 3; ++a) nrm[a] += w * normals[3 * i + a];
        }
    }
    FD_UNROLL
    for (int a = 0; a < 3; ++a) {
        rgb[a] = col[a];
        normal[a] = nrm[a];
    }
    *opacity = op;
    *depth = dep;
}

// Backward (instant-ngp / nerfacc style). With g_w_i the total gradient on weight i (direct + through
// rgb/opacity/depth/normal), dL/ds_k = g_w_k T_k e^{-s_k} - sum_{i>k} g_w_i w_i. A first walk along the ray
// sums S = sum_i g_w_i w_i, a second gives every suffix sum as S - prefix. Recomputing S from the inputs
// rather than from the forward's outputs keeps the op's autograd from saving its outputs (which costs a
// detach each way per output).
template <typename S>
FD_HOST_DEVICE FD_INLINE S weight_grad(int mode, const S* albedo, const S* normals, const ShadeInputs<S>& in, S t_mid,
                                       int64_t i, const S* g_rgb, S g_op, S g_depth, const S* g_normal,
                                       const S* g_weights) {
    S c[3];
    const S* n = normals ? normals + 3 * i : nullptr;
    shade(mode, albedo + 3 * i, n, in, t_mid, c);
    S gw = g_rgb[0] * c[0] + g_rgb[1] * c[1] + g_rgb[2] * c[2] + g_op + g_depth * t_mid;
    if (n) gw += g_normal[0] * n[0] + g_normal[1] * n[1] + g_normal[2] * n[2];
    if (g_weights) gw += g_weights[i];
    return gw;
}

template <typename S>
FD_HOST_DEVICE FD_INLINE void composite_backward_ray(int64_t begin, int64_t end, int mode, const S* t_starts,
                                                     const S* t_ends, const S* sigmas, const S* albedo,
                                                     const S* normals, const ShadeInputs<S>& in,
                                                     const S* g_rgb, S g_op, S g_depth, const S* g_normal,
                                                     const S* g_weights, S* grad_sigmas, S* grad_albedo,
                                                     S* grad_normals) {
    S total = S(0);
    {
        S acc = S(0);
        for (int64_t i = begin; i < end; ++i) {
            S s = sigmas[i] * (t_ends[i] - t_starts[i]);
            S w = fd_exp(-acc) * (S(1) - fd_exp(-s));
            acc += s;
            S t_mid = (t_starts[i] + t_ends[i]) * S(0.5);
            total += weight_grad(mode, albedo, normals, in, t_mid, i, g_rgb, g_op, g_depth, g_normal, g_weights) * w;
        }
    }
    S acc = S(0), prefix = S(0);
    for (int64_t i = begin; i < end; ++i) {
        S dt = t_ends[i] - t_starts[i];
        S s = sigmas[i] * dt;
        S e = fd_exp(-s);
        S T = fd_exp(-acc);
        S w = T * (S(1) - e);
        acc += s;
        S t_mid = (t_starts[i] + t_ends[i]) * S(0.5);
        const S* n = normals ? normals + 3 * i : nullptr;
        const S* alb = albedo + 3 * i;
        // colour and its pieces
        S c[3], l[3] = {S(0), S(0), S(0)};
        S dot = S(0), I = S(1);
        if (mode == kAlbedo) {
            c[0] = alb[0]; c[1] = alb[1]; c[2] = alb[2];
        } else {
            dot = light_dir(in, t_mid, n, l);
            I = in.intensity * (dot > S(0) ? dot : S(0)) + in.ambient;
            FD_UNROLL
            for (int a = 0; a < 3; ++a) c[a] = mode == kTextureless ? I : alb[a] * I;
        }
        S gw = g_rgb[0] * c[0] + g_rgb[1] * c[1] + g_rgb[2] * c[2] + g_op + g_depth * t_mid;
        if (n) gw += g_normal[0] * n[0] + g_normal[1] * n[1] + g_normal[2] * n[2];
        if (g_weights) gw += g_weights[i];
        prefix += gw * w;
        S g_s = gw * T * e - (total - prefix);
        grad_sigmas[i] = g_s * dt;
        // colour gradients
        S g_I = S(0);
        if (mode == kAlbedo) {
            FD_UNROLL
            for (int a = 0; a < 3; ++a) grad_albedo[3 * i + a] = w * g_rgb[a];
        } else if (mode == kLambertian) {
            FD_UNROLL
            for (int a = 0; a < 3; ++a) {
                grad_albedo[3 * i + a] = w * g_rgb[a] * I;
                g_I += w * g_rgb[a] * alb[a];
            }
        } else {
            FD_UNROLL
            for (int a = 0; a < 3; ++a) grad_albedo[3 * i + a] = S(0);
            g_I = w * (g_rgb[0] + g_rgb[1] + g_rgb[2]);
        }
        if (grad_normals) {
            // torch's clamp_min passes the gradient where input >= min
            S g_dot = (mode != kAlbedo && dot >= S(0)) ? g_I * in.intensity : S(0);
            FD_UNROLL
            for (int a = 0; a < 3; ++a) grad_normals[3 * i + a] = w * g_normal[a] + g_dot * l[a];
        }
    }
}

}  // namespace render
}  // namespace fastdream
