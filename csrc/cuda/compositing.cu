// CUDA launchers of volume rendering on packed samples: one thread per ray walks its samples
// (forward), and walks them again for the backward (instant-ngp / nerfacc style).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastdream/cuda_glue.cuh"
#include "fastdream/torch_glue.h"

namespace fastdream {
namespace {

template <typename S>
__global__ void weights_fwd_kernel(int64_t R, const int64_t* __restrict__ off, const S* __restrict__ ts,
                                   const S* __restrict__ te, const S* __restrict__ sig, S* w, S* T, S* a) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= R) return;
    render::weights_forward_ray(off[r], off[r + 1], ts, te, sig, w, T, a);
}

template <typename S>
__global__ void weights_bwd_kernel(int64_t R, const int64_t* __restrict__ off, const S* __restrict__ ts,
                                   const S* __restrict__ te, const S* __restrict__ sig, const S* __restrict__ T,
                                   const S* __restrict__ a, const S* gw, const S* gt, const S* ga, S* grad_s) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= R) return;
    render::weights_backward_ray(off[r], off[r + 1], ts, te, sig, T, a, gw, gt, ga, grad_s);
}

template <typename S>
struct DeviceComposite {
    const int64_t* off;
    const S *ts, *te, *sig, *albedo, *normals, *origins, *directions, *lights, *intensity, *ambient;
    int mode;

    __device__ __forceinline__ render::ShadeInputs<S> shade(int64_t r) const {
        return {origins + 3 * r, directions + 3 * r, lights + 3 * r, intensity[r], ambient[r]};
    }
};

template <typename S>
DeviceComposite<S> device_args(const CompositeArgs& a, int64_t mode) {
    return {a.off.data_ptr<int64_t>(), a.t_starts.data_ptr<S>(), a.t_ends.data_ptr<S>(), a.sigmas.data_ptr<S>(),
            a.albedo.data_ptr<S>(), a.normals.defined() ? a.normals.data_ptr<S>() : nullptr,
            a.origins.data_ptr<S>(), a.directions.data_ptr<S>(), a.lights.data_ptr<S>(), a.intensity.data_ptr<S>(),
            a.ambient.data_ptr<S>(), static_cast<int>(mode)};
}

template <typename S>
__global__ void composite_fwd_kernel(int64_t R, const DeviceComposite<S> c, S* rgb, S* op, S* depth, S* normal,
                                     S* weights) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= R) return;
    render::composite_forward_ray(c.off[r], c.off[r + 1], c.mode, c.ts, c.te, c.sig, c.albedo, c.normals, c.shade(r),
                                  rgb + 3 * r, op + r, depth + r, normal + 3 * r, weights);
}

template <typename S>
__global__ void composite_bwd_kernel(int64_t R, const DeviceComposite<S> c, const S* rgb, const S* op, const S* depth,
                                     const S* normal, const S* weights, const S* g_rgb, const S* g_op,
                                     const S* g_depth, const S* g_normal, const S* g_weights, S* grad_sigmas,
                                     S* grad_albedo, S* grad_normals) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= R) return;
    render::composite_backward_ray(c.off[r], c.off[r + 1], c.mode, c.ts, c.te, c.sig, c.albedo, c.normals, c.shade(r),
                                   rgb + 3 * r, op[r], depth[r], normal + 3 * r, weights, g_rgb + 3 * r, g_op[r],
                                   g_depth[r], g_normal + 3 * r, g_weights, grad_sigmas, grad_albedo, grad_normals);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> render_weights_fwd_cuda(const at::Tensor& t_starts_,
                                                                       const at::Tensor& t_ends_,
                                                                       const at::Tensor& sigmas_,
                                                                       const at::Tensor& ray_offsets_) {
    check_same_device("render_weights_fwd", {t_starts_, t_ends_, sigmas_, ray_offsets_});
    check_packed(t_starts_, t_ends_, sigmas_, ray_offsets_);
    c10::cuda::CUDAGuard guard(sigmas_.device());
    auto sigmas = sigmas_.contiguous();
    auto t_starts = t_starts_.to(sigmas.scalar_type()).contiguous();
    auto t_ends = t_ends_.to(sigmas.scalar_type()).contiguous();
    auto off = ray_offsets_.contiguous();
    const int64_t R = off.numel() - 1;
    auto w = at::empty_like(sigmas), T = at::empty_like(sigmas), a = at::empty_like(sigmas);
    if (R == 0 || sigmas.numel() == 0) return {w, T, a};
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "render_weights_fwd_cuda", [&] {
        using S = scalar_t;
        weights_fwd_kernel<S><<<cuda::blocks_for(R), cuda::kThreads, 0, cuda::stream()>>>(
            R, off.data_ptr<int64_t>(), t_starts.data_ptr<S>(), t_ends.data_ptr<S>(), sigmas.data_ptr<S>(),
            w.data_ptr<S>(), T.data_ptr<S>(), a.data_ptr<S>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {w, T, a};
}

at::Tensor render_weights_bwd_cuda(const c10::optional<at::Tensor>& gw_, const c10::optional<at::Tensor>& gt_,
                                   const c10::optional<at::Tensor>& ga_, const at::Tensor& t_starts_,
                                   const at::Tensor& t_ends_, const at::Tensor& sigmas_, const at::Tensor& ray_offsets_,
                                   const at::Tensor& trans_, const at::Tensor& alphas_) {
    check_same_device("render_weights_bwd",
                      {or_undefined(gw_), or_undefined(gt_), or_undefined(ga_), t_starts_, t_ends_, sigmas_, ray_offsets_, trans_, alphas_});
    check_packed(t_starts_, t_ends_, sigmas_, ray_offsets_);
    c10::cuda::CUDAGuard guard(sigmas_.device());
    auto sigmas = sigmas_.contiguous();
    const auto dt = sigmas.scalar_type();
    auto t_starts = t_starts_.to(dt).contiguous(), t_ends = t_ends_.to(dt).contiguous();
    auto trans = trans_.to(dt).contiguous(), alphas = alphas_.to(dt).contiguous();
    auto off = ray_offsets_.contiguous();
    const int64_t R = off.numel() - 1;
    auto grad_s = at::empty_like(sigmas);
    if (R == 0 || sigmas.numel() == 0) return grad_s;
    AT_DISPATCH_FLOATING_TYPES(dt, "render_weights_bwd_cuda", [&] {
        using S = scalar_t;
        at::Tensor k1, k2, k3;
        const S* gw = opt_ptr<S>(gw_, k1, dt);
        const S* gt = opt_ptr<S>(gt_, k2, dt);
        const S* ga = opt_ptr<S>(ga_, k3, dt);
        weights_bwd_kernel<S><<<cuda::blocks_for(R), cuda::kThreads, 0, cuda::stream()>>>(
            R, off.data_ptr<int64_t>(), t_starts.data_ptr<S>(), t_ends.data_ptr<S>(), sigmas.data_ptr<S>(),
            trans.data_ptr<S>(), alphas.data_ptr<S>(), gw, gt, ga, grad_s.data_ptr<S>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return grad_s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_fwd_cuda(
    const at::Tensor& t_starts, const at::Tensor& t_ends, const at::Tensor& ray_offsets, const at::Tensor& sigmas,
    const at::Tensor& albedo, const c10::optional<at::Tensor>& normals, const at::Tensor& origins,
    const at::Tensor& directions, const at::Tensor& light_positions, const at::Tensor& light_intensity,
    const at::Tensor& ambient, int64_t mode) {
    check_same_device("composite_fwd",
                      {t_starts, t_ends, ray_offsets, sigmas, albedo, or_undefined(normals), origins, directions, light_positions, light_intensity, ambient});
    c10::cuda::CUDAGuard guard(sigmas.device());
    CompositeArgs a = prepare_composite(t_starts, t_ends, ray_offsets, sigmas, albedo, normals, origins, directions,
                                        light_positions, light_intensity, ambient, mode);
    const int64_t R = a.off.numel() - 1;
    auto opts = a.sigmas.options();
    auto rgb = at::empty({R, 3}, opts), op = at::empty({R, 1}, opts), depth = at::empty({R, 1}, opts);
    auto normal = at::empty({R, 3}, opts), weights = at::empty_like(a.sigmas);
    if (R == 0) return {rgb, op, depth, normal, weights};
    AT_DISPATCH_FLOATING_TYPES(a.sigmas.scalar_type(), "composite_fwd_cuda", [&] {
        using S = scalar_t;
        composite_fwd_kernel<S><<<cuda::blocks_for(R), cuda::kThreads, 0, cuda::stream()>>>(
            R, device_args<S>(a, mode), rgb.data_ptr<S>(), op.data_ptr<S>(), depth.data_ptr<S>(), normal.data_ptr<S>(),
            weights.data_ptr<S>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {rgb, op, depth, normal, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_bwd_cuda(
    const at::Tensor& g_rgb_, const at::Tensor& g_op_, const at::Tensor& g_depth_, const at::Tensor& g_normal_,
    const c10::optional<at::Tensor>& g_weights_, const at::Tensor& t_starts, const at::Tensor& t_ends,
    const at::Tensor& ray_offsets, const at::Tensor& sigmas, const at::Tensor& albedo,
    const c10::optional<at::Tensor>& normals, const at::Tensor& origins, const at::Tensor& directions,
    const at::Tensor& light_positions, const at::Tensor& light_intensity, const at::Tensor& ambient,
    const at::Tensor& rgb_, const at::Tensor& op_, const at::Tensor& depth_, const at::Tensor& normal_,
    const at::Tensor& weights_, int64_t mode, bool need_normals_grad) {
    check_same_device("composite_bwd",
                      {g_rgb_, g_op_, g_depth_, g_normal_, or_undefined(g_weights_), t_starts, t_ends, ray_offsets, sigmas, albedo, or_undefined(normals), origins, directions, light_positions, light_intensity, ambient, rgb_, op_, depth_, normal_, weights_});
    c10::cuda::CUDAGuard guard(sigmas.device());
    CompositeArgs a = prepare_composite(t_starts, t_ends, ray_offsets, sigmas, albedo, normals, origins, directions,
                                        light_positions, light_intensity, ambient, mode);
    const int64_t R = a.off.numel() - 1;
    const auto dt = a.sigmas.scalar_type();
    CompositeBackwardTensors bw = prepare_composite_backward(a, g_rgb_, g_op_, g_depth_, g_normal_, rgb_, op_, depth_,
                                                             normal_, weights_, need_normals_grad);
    auto &g_rgb = bw.g_rgb, &g_op = bw.g_op, &g_depth = bw.g_depth, &g_normal = bw.g_normal;
    auto &rgb = bw.rgb, &op = bw.op, &depth = bw.depth, &normal = bw.normal, &weights = bw.weights;
    auto &grad_sigmas = bw.grad_sigmas, &grad_albedo = bw.grad_albedo, &grad_normals = bw.grad_normals;
    const bool want_n = bw.want_normals;
    if (R == 0) return {grad_sigmas, grad_albedo, grad_normals};
    AT_DISPATCH_FLOATING_TYPES(dt, "composite_bwd_cuda", [&] {
        using S = scalar_t;
        at::Tensor keep;
        const S* gw = opt_ptr<S>(g_weights_, keep, dt);
        composite_bwd_kernel<S><<<cuda::blocks_for(R), cuda::kThreads, 0, cuda::stream()>>>(
            R, device_args<S>(a, mode), rgb.data_ptr<S>(), op.data_ptr<S>(), depth.data_ptr<S>(), normal.data_ptr<S>(),
            weights.data_ptr<S>(), g_rgb.data_ptr<S>(), g_op.data_ptr<S>(), g_depth.data_ptr<S>(),
            g_normal.data_ptr<S>(), gw, grad_sigmas.data_ptr<S>(), grad_albedo.data_ptr<S>(),
            want_n ? grad_normals.data_ptr<S>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {grad_sigmas, grad_albedo, grad_normals};
}

}  // namespace
}  // namespace fastdream

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("render_weights_fwd", &fastdream::render_weights_fwd_cuda);
    m.impl("render_weights_bwd", &fastdream::render_weights_bwd_cuda);
    m.impl("composite_fwd", &fastdream::composite_fwd_cuda);
    m.impl("composite_bwd", &fastdream::composite_bwd_cuda);
}
