// Launchers of volume rendering on packed samples, written once for both extensions (see
// fastdream/parallel_for.h): one work item per ray walks its samples for the forward and walks them again
// for the backward (instant-ngp / nerfacc style). Included by csrc/cpu/ops_cpu.cpp and
// csrc/cuda/compositing.cu, which register these functions for CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include "fastdream/parallel_for.h"
#include "fastdream/torch_glue.h"

namespace fastdream {
namespace {

constexpr int64_t kRayGrainLaunch = 64;  // rays per CPU task

// Raw pointers of a composite call, copied by value into the per-ray work items.
template <typename S>
struct CompositePtrs {
    const int64_t* off;
    const S *ts, *te, *sig, *albedo, *normals, *origins, *directions, *lights, *intensity, *ambient;
    int mode;

    FD_HOST_DEVICE FD_INLINE render::ShadeInputs<S> shade(int64_t r) const {
        return {origins + 3 * r, directions + 3 * r, lights + 3 * r, intensity[r], ambient[r]};
    }
};

template <typename S>
CompositePtrs<S> composite_ptrs(const CompositeArgs& a, int64_t mode) {
    return {a.off.data_ptr<int64_t>(), a.t_starts.data_ptr<S>(), a.t_ends.data_ptr<S>(), a.sigmas.data_ptr<S>(),
            a.albedo.data_ptr<S>(), a.normals.defined() ? a.normals.data_ptr<S>() : nullptr,
            a.origins.data_ptr<S>(), a.directions.data_ptr<S>(), a.lights.data_ptr<S>(), a.intensity.data_ptr<S>(),
            a.ambient.data_ptr<S>(), static_cast<int>(mode)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> render_weights_fwd(const at::Tensor& t_starts_, const at::Tensor& t_ends_,
                                                                  const at::Tensor& sigmas_,
                                                                  const at::Tensor& ray_offsets_) {
    check_same_device("render_weights_fwd", {t_starts_, t_ends_, sigmas_, ray_offsets_});
    check_packed(t_starts_, t_ends_, sigmas_, ray_offsets_);
    DeviceGuard guard(sigmas_.device());
    auto sigmas = sigmas_.contiguous();
    auto t_starts = t_starts_.to(sigmas.scalar_type()).contiguous();
    auto t_ends = t_ends_.to(sigmas.scalar_type()).contiguous();
    auto off = ray_offsets_.contiguous();
    const int64_t R = off.numel() - 1;
    auto w = at::empty_like(sigmas), T = at::empty_like(sigmas), a = at::empty_like(sigmas);
    if (R == 0 || sigmas.numel() == 0) return {w, T, a};
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "render_weights_fwd", [&] {
        using S = scalar_t;
        const int64_t* o = off.data_ptr<int64_t>();
        const S *ts = t_starts.data_ptr<S>(), *te = t_ends.data_ptr<S>(), *sig = sigmas.data_ptr<S>();
        S *wp = w.data_ptr<S>(), *Tp = T.data_ptr<S>(), *ap = a.data_ptr<S>();
        parallel_for(R, kRayGrainLaunch, [=] FD_LAMBDA(int64_t r) {
            render::weights_forward_ray(o[r], o[r + 1], ts, te, sig, wp, Tp, ap);
        });
    });
    return {w, T, a};
}

at::Tensor render_weights_bwd(const c10::optional<at::Tensor>& gw_, const c10::optional<at::Tensor>& gt_,
                              const c10::optional<at::Tensor>& ga_, const at::Tensor& t_starts_,
                              const at::Tensor& t_ends_, const at::Tensor& sigmas_, const at::Tensor& ray_offsets_,
                              const at::Tensor& trans_, const at::Tensor& alphas_) {
    check_same_device("render_weights_bwd",
                      {or_undefined(gw_), or_undefined(gt_), or_undefined(ga_), t_starts_, t_ends_, sigmas_, ray_offsets_, trans_, alphas_});
    check_packed(t_starts_, t_ends_, sigmas_, ray_offsets_);
    DeviceGuard guard(sigmas_.device());
    auto sigmas = sigmas_.contiguous();
    const auto dt = sigmas.scalar_type();
    auto t_starts = t_starts_.to(dt).contiguous(), t_ends = t_ends_.to(dt).contiguous();
    auto trans = trans_.to(dt).contiguous(), alphas = alphas_.to(dt).contiguous();
    auto off = ray_offsets_.contiguous();
    const int64_t R = off.numel() - 1;
    auto grad_s = at::empty_like(sigmas);
    if (R == 0 || sigmas.numel() == 0) return grad_s;
    AT_DISPATCH_FLOATING_TYPES(dt, "render_weights_bwd", [&] {
        using S = scalar_t;
        at::Tensor k1, k2, k3;
        const S* gw = opt_ptr<S>(gw_, k1, dt);
        const S* gt = opt_ptr<S>(gt_, k2, dt);
        const S* ga = opt_ptr<S>(ga_, k3, dt);
        const int64_t* o = off.data_ptr<int64_t>();
        const S *ts = t_starts.data_ptr<S>(), *te = t_ends.data_ptr<S>(), *sig = sigmas.data_ptr<S>();
        const S *Tp = trans.data_ptr<S>(), *ap = alphas.data_ptr<S>();
        S* gs = grad_s.data_ptr<S>();
        parallel_for(R, kRayGrainLaunch, [=] FD_LAMBDA(int64_t r) {
            render::weights_backward_ray(o[r], o[r + 1], ts, te, sig, Tp, ap, gw, gt, ga, gs);
        });
    });
    return grad_s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_fwd(
    const at::Tensor& t_starts, const at::Tensor& t_ends, const at::Tensor& ray_offsets, const at::Tensor& sigmas,
    const at::Tensor& albedo, const c10::optional<at::Tensor>& normals, const at::Tensor& origins,
    const at::Tensor& directions, const at::Tensor& light_positions, const at::Tensor& light_intensity,
    const at::Tensor& ambient, int64_t mode) {
    check_same_device("composite_fwd",
                      {t_starts, t_ends, ray_offsets, sigmas, albedo, or_undefined(normals), origins, directions, light_positions, light_intensity, ambient});
    DeviceGuard guard(sigmas.device());
    CompositeArgs a = prepare_composite(t_starts, t_ends, ray_offsets, sigmas, albedo, normals, origins, directions,
                                        light_positions, light_intensity, ambient, mode);
    const int64_t R = a.off.numel() - 1;
    auto opts = a.sigmas.options();
    auto rgb = at::empty({R, 3}, opts), op = at::empty({R, 1}, opts), depth = at::empty({R, 1}, opts);
    auto normal = at::empty({R, 3}, opts), weights = at::empty_like(a.sigmas);
    if (R == 0) return {rgb, op, depth, normal, weights};
    AT_DISPATCH_FLOATING_TYPES(a.sigmas.scalar_type(), "composite_fwd", [&] {
        using S = scalar_t;
        const CompositePtrs<S> c = composite_ptrs<S>(a, mode);
        S *rgbp = rgb.data_ptr<S>(), *opp = op.data_ptr<S>(), *dp = depth.data_ptr<S>(), *np = normal.data_ptr<S>();
        S* wp = weights.data_ptr<S>();
        parallel_for(R, kRayGrainLaunch, [=] FD_LAMBDA(int64_t r) {
            render::composite_forward_ray(c.off[r], c.off[r + 1], c.mode, c.ts, c.te, c.sig, c.albedo, c.normals,
                                          c.shade(r), rgbp + 3 * r, opp + r, dp + r, np + 3 * r, wp);
        });
    });
    return {rgb, op, depth, normal, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_bwd(
    const at::Tensor& g_rgb_, const at::Tensor& g_op_, const at::Tensor& g_depth_, const at::Tensor& g_normal_,
    const c10::optional<at::Tensor>& g_weights_, const at::Tensor& t_starts, const at::Tensor& t_ends,
    const at::Tensor& ray_offsets, const at::Tensor& sigmas, const at::Tensor& albedo,
    const c10::optional<at::Tensor>& normals, const at::Tensor& origins, const at::Tensor& directions,
    const at::Tensor& light_positions, const at::Tensor& light_intensity, const at::Tensor& ambient, int64_t mode,
    bool need_normals_grad) {
    check_same_device("composite_bwd",
                      {g_rgb_, g_op_, g_depth_, g_normal_, or_undefined(g_weights_), t_starts, t_ends, ray_offsets, sigmas, albedo, or_undefined(normals), origins, directions, light_positions, light_intensity, ambient});
    DeviceGuard guard(sigmas.device());
    CompositeArgs a = prepare_composite(t_starts, t_ends, ray_offsets, sigmas, albedo, normals, origins, directions,
                                        light_positions, light_intensity, ambient, mode);
    const int64_t R = a.off.numel() - 1;
    const auto dt = a.sigmas.scalar_type();
    CompositeBackwardTensors bw = prepare_composite_backward(a, g_rgb_, g_op_, g_depth_, g_normal_, need_normals_grad);
    if (R == 0) return {bw.grad_sigmas, bw.grad_albedo, bw.grad_normals};
    AT_DISPATCH_FLOATING_TYPES(dt, "composite_bwd", [&] {
        using S = scalar_t;
        at::Tensor keep;
        const S* gw = opt_ptr<S>(g_weights_, keep, dt);
        const CompositePtrs<S> c = composite_ptrs<S>(a, mode);
        const S *g_rgb = bw.g_rgb.data_ptr<S>(), *g_op = bw.g_op.data_ptr<S>(), *g_depth = bw.g_depth.data_ptr<S>();
        const S* g_normal = bw.g_normal.data_ptr<S>();
        S *gs = bw.grad_sigmas.data_ptr<S>(), *ga = bw.grad_albedo.data_ptr<S>();
        S* gn = bw.want_normals ? bw.grad_normals.data_ptr<S>() : nullptr;
        parallel_for(R, kRayGrainLaunch, [=] FD_LAMBDA(int64_t r) {
            render::composite_backward_ray(c.off[r], c.off[r + 1], c.mode, c.ts, c.te, c.sig, c.albedo, c.normals,
                                           c.shade(r), g_rgb + 3 * r, g_op[r], g_depth[r], g_normal + 3 * r, gw, gs, ga, gn);
        });
    });
    return {bw.grad_sigmas, bw.grad_albedo, bw.grad_normals};
}

}  // namespace
}  // namespace fastdream
