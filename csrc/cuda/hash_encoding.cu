// CUDA launchers of the hash-grid encoding: one thread per (point, level) for the forward and the
// params gradient (atomics), one thread per point for dL/dx and the double backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "fastdream/cuda_glue.cuh"
#include "fastdream/torch_glue.h"

namespace fastdream {
namespace {

using hashgrid::GridMeta;

// Parameter gradients are summed in float for half params and cast once at the end (as tiny-cuda-nn
// does): a half atomicAdd per contribution would drop every one below half's resolution (~6e-8).
template <typename P>
using GradAcc = std::conditional_t<std::is_same_v<P, __half>, float, P>;

at::Tensor params_grad_accumulator(const at::Tensor& params, bool needed) {
    const auto dtype = params.scalar_type() == at::kHalf ? at::kFloat : params.scalar_type();
    return needed ? at::zeros({params.numel()}, params.options().dtype(dtype)) : at::empty({0}, params.options());
}

template <int NF, typename S, typename P>
__global__ void hash_fwd_kernel(int64_t N, const GridMeta m, const S* __restrict__ x, const P* __restrict__ params,
                                S* __restrict__ y) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int l = blockIdx.y;
    if (n >= N) return;
    S out[NF];
    hashgrid::encode_level<NF>(m, l, x + 3 * n, params, out);
    S* dst = y + n * m.n_levels * NF + l * NF;
#pragma unroll
    for (int f = 0; f < NF; ++f) dst[f] = out[f];
}

template <int NF, typename S, typename G>
__global__ void hash_bwd_params_kernel(int64_t N, const GridMeta m, const S* __restrict__ x, const S* __restrict__ gy,
                                       G* __restrict__ grad) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int l = blockIdx.y;
    if (n >= N) return;
    S g[NF];
    const S* src = gy + n * m.n_levels * NF + l * NF;
#pragma unroll
    for (int f = 0; f < NF; ++f) g[f] = src[f];
    cuda::AtomicAcc<S, G> acc{grad};
    hashgrid::encode_level_backward_params<NF>(m, l, x + 3 * n, g, acc);
}

template <int NF, typename S, typename P>
__global__ void hash_bwd_x_kernel(int64_t N, const GridMeta m, const S* __restrict__ x, const S* __restrict__ gy,
                                  const P* __restrict__ params, S* __restrict__ gx) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= N) return;
    S g[3] = {S(0), S(0), S(0)};
    for (int l = 0; l < m.n_levels; ++l)
        hashgrid::encode_level_backward_x<NF>(m, l, x + 3 * n, gy + n * m.n_levels * NF + l * NF, params, g);
    gx[3 * n] = g[0];
    gx[3 * n + 1] = g[1];
    gx[3 * n + 2] = g[2];
}

template <int NF, typename S, typename P, typename G>
__global__ void hash_bwd_bwd_kernel(int64_t N, const GridMeta m, const S* __restrict__ x, const S* __restrict__ gy,
                                    const S* __restrict__ ggx, const P* __restrict__ params, S* __restrict__ ggy,
                                    G* grad_params, S* __restrict__ gx) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= N) return;
    S g2[3] = {S(0), S(0), S(0)};
    cuda::AtomicAcc<S, G> acc{grad_params};
    for (int l = 0; l < m.n_levels; ++l) {
        const int64_t o = n * m.n_levels * NF + l * NF;
        hashgrid::encode_level_backward_backward<NF>(m, l, x + 3 * n, gy + o, ggx + 3 * n, params, ggy + o, g2,
                                                     grad_params ? &acc : static_cast<cuda::AtomicAcc<S, G>*>(nullptr));
    }
    if (gx) {
        gx[3 * n] = g2[0];
        gx[3 * n + 1] = g2[1];
        gx[3 * n + 2] = g2[2];
    }
}

at::Tensor hash_encode_fwd_cuda(const at::Tensor& x_, const at::Tensor& params_, c10::ArrayRef<double> scales,
                                c10::IntArrayRef resolutions, c10::IntArrayRef offsets, c10::IntArrayRef hashed,
                                int64_t n_features) {
    check_same_device("hash_encode_fwd", {x_, params_});
    check_hash_inputs(x_, params_, offsets, n_features);
    const GridMeta m = make_grid_meta(scales, resolutions, offsets, hashed, n_features);
    c10::cuda::CUDAGuard guard(x_.device());
    auto x = x_.contiguous();
    auto params = params_.contiguous();
    const int64_t N = x.size(0);
    auto y = at::empty({N, m.n_levels * n_features}, x.options());
    if (N == 0) return y;
    const dim3 grid(cuda::blocks_for(N), m.n_levels);
    FD_DISPATCH_HASH_TYPES(x, params, __half, [&] {
        const P* pp = static_cast<const P*>(params.data_ptr());
        FD_DISPATCH_N_FEATURES(n_features, [&] {
            hash_fwd_kernel<kF, S, P><<<grid, cuda::kThreads, 0, cuda::stream()>>>(N, m, x.data_ptr<S>(), pp,
                                                                                    y.data_ptr<S>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
    return y;
}

std::tuple<at::Tensor, at::Tensor> hash_encode_bwd_cuda(const at::Tensor& grad_y_, const at::Tensor& x_,
                                                        const at::Tensor& params_, c10::ArrayRef<double> scales,
                                                        c10::IntArrayRef resolutions, c10::IntArrayRef offsets,
                                                        c10::IntArrayRef hashed, int64_t n_features,
                                                        bool need_params_grad, bool need_x_grad) {
    check_same_device("hash_encode_bwd", {grad_y_, x_, params_});
    check_hash_inputs(x_, params_, offsets, n_features);
    const GridMeta m = make_grid_meta(scales, resolutions, offsets, hashed, n_features);
    c10::cuda::CUDAGuard guard(x_.device());
    auto x = x_.contiguous();
    auto params = params_.contiguous();
    auto gy = grad_y_.to(x.scalar_type()).contiguous();
    const int64_t N = x.size(0);
    TORCH_CHECK(gy.dim() == 2 && gy.size(0) == N && gy.size(1) == m.n_levels * n_features,
                "hash_encode_bwd: grad_y must be (N, L*F)");
    at::Tensor gparams = params_grad_accumulator(params, need_params_grad);
    at::Tensor gx = need_x_grad ? at::empty({N, 3}, x.options()) : at::empty({0}, x.options());
    if (N == 0) {
        if (need_x_grad) gx.zero_();
        return {gparams, gx};
    }
    FD_DISPATCH_HASH_TYPES(x, params, __half, [&] {
        const P* pp = static_cast<const P*>(params.data_ptr());
        FD_DISPATCH_N_FEATURES(n_features, [&] {
            if (need_params_grad) {
                at::globalContext().alertNotDeterministic("hash_encode_bwd (CUDA params gradient, atomic sums)");
                auto* gp = static_cast<GradAcc<P>*>(gparams.data_ptr());
                const dim3 grid(cuda::blocks_for(N), m.n_levels);
                hash_bwd_params_kernel<kF, S, GradAcc<P>><<<grid, cuda::kThreads, 0, cuda::stream()>>>(
                    N, m, x.data_ptr<S>(), gy.data_ptr<S>(), gp);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            if (need_x_grad) {
                hash_bwd_x_kernel<kF, S, P><<<cuda::blocks_for(N), cuda::kThreads, 0, cuda::stream()>>>(
                    N, m, x.data_ptr<S>(), gy.data_ptr<S>(), pp, gx.data_ptr<S>());
                C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
        });
    });
    return {gparams.to(params.scalar_type()), gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hash_encode_bwd_bwd_cuda(
    const at::Tensor& ggx_, const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& params_,
    c10::ArrayRef<double> scales, c10::IntArrayRef resolutions, c10::IntArrayRef offsets, c10::IntArrayRef hashed,
    int64_t n_features, bool need_params_grad, bool need_x_grad) {
    check_same_device("hash_encode_bwd_bwd", {ggx_, grad_y_, x_, params_});
    check_hash_inputs(x_, params_, offsets, n_features);
    const GridMeta m = make_grid_meta(scales, resolutions, offsets, hashed, n_features);
    c10::cuda::CUDAGuard guard(x_.device());
    auto x = x_.contiguous();
    auto params = params_.contiguous();
    auto gy = grad_y_.to(x.scalar_type()).contiguous();
    auto ggx = ggx_.to(x.scalar_type()).contiguous();
    const int64_t N = x.size(0);
    TORCH_CHECK(gy.dim() == 2 && gy.size(0) == N && gy.size(1) == m.n_levels * n_features,
                "hash_encode_bwd_bwd: grad_y must be (N, L*F)");
    TORCH_CHECK(ggx.dim() == 2 && ggx.size(0) == N && ggx.size(1) == 3, "hash_encode_bwd_bwd: ggx must be (N, 3)");
    at::Tensor ggy = at::empty({N, m.n_levels * n_features}, x.options());
    at::Tensor gparams = params_grad_accumulator(params, need_params_grad);
    at::Tensor gx = need_x_grad ? at::empty({N, 3}, x.options()) : at::empty({0}, x.options());
    if (N == 0) {
        if (need_x_grad) gx.zero_();
        return {ggy, gparams, gx};
    }
    FD_DISPATCH_HASH_TYPES(x, params, __half, [&] {
        const P* pp = static_cast<const P*>(params.data_ptr());
        if (need_params_grad)
            at::globalContext().alertNotDeterministic("hash_encode_bwd_bwd (CUDA params gradient, atomic sums)");
        auto* gp = need_params_grad ? static_cast<GradAcc<P>*>(gparams.data_ptr()) : nullptr;
        FD_DISPATCH_N_FEATURES(n_features, [&] {
            hash_bwd_bwd_kernel<kF, S, P, GradAcc<P>><<<cuda::blocks_for(N), cuda::kThreads, 0, cuda::stream()>>>(
                N, m, x.data_ptr<S>(), gy.data_ptr<S>(), ggx.data_ptr<S>(), pp, ggy.data_ptr<S>(), gp,
                need_x_grad ? gx.data_ptr<S>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    });
    return {ggy, gparams.to(params.scalar_type()), gx};
}

}  // namespace
}  // namespace fastdream

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("hash_encode_fwd", &fastdream::hash_encode_fwd_cuda);
    m.impl("hash_encode_bwd", &fastdream::hash_encode_bwd_cuda);
    m.impl("hash_encode_bwd_bwd", &fastdream::hash_encode_bwd_bwd_cuda);
}
