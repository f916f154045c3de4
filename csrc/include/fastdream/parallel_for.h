// One launcher for the CPU and the CUDA extension (Open3D's ParallelFor): `parallel_for(n, grain, fn)`
// calls fn(i) for every i in [0, n). Compiled by the host compiler it is at::parallel_for (OpenMP) over
// blocks of `grain` indices; compiled by nvcc it is a kernel with one thread per index on the current
// stream (grain unused). fn must be a `FD_LAMBDA` lambda capturing by value (pointers, sizes, structs of
// pointers): under nvcc that is a __host__ __device__ extended lambda (--extended-lambda).
//
// A launcher written against this header (see csrc/launchers/) is included once by the CPU translation
// unit and once by a CUDA one, each registering it for its dispatch key. Everything here has internal
// linkage: the two compilations are different functions under the same names.
#pragma once

#include <ATen/ATen.h>

#include "fastdream/common.h"

#if defined(__CUDACC__)
#include "fastdream/cuda_glue.cuh"
#define FD_LAMBDA __host__ __device__
#else
#include <ATen/Parallel.h>
#define FD_LAMBDA
#endif

namespace fastdream {
namespace {

#if defined(__CUDACC__)
template <typename Fn>
__global__ void parallel_for_kernel(int64_t n, Fn fn) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) fn(i);
}

template <typename Fn>
void parallel_for(int64_t n, int64_t /*grain*/, Fn fn) {
    if (n <= 0) return;
    parallel_for_kernel<Fn><<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::stream()>>>(n, fn);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Makes the tensor's GPU current for the launcher's allocations and kernels.
using DeviceGuard = c10::cuda::CUDAGuard;
#else
template <typename Fn>
void parallel_for(int64_t n, int64_t grain, Fn fn) {
    if (n <= 0) return;
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) fn(i);
    });
}

struct DeviceGuard {
    explicit DeviceGuard(const at::Device&) {}
};
#endif

}  // namespace
}  // namespace fastdream
