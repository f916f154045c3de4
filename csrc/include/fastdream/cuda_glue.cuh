// CUDA launch helpers shared by csrc/cuda/*.cu. Uses c10/cuda only (ATen/cuda/CUDAContext.h pulls in
// cusparse.h, which cut-down toolkits lack).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>

namespace fastdream {
namespace cuda {

constexpr int kThreads = 128;

inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
    return static_cast<unsigned int>((n + threads - 1) / threads);
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Adds w * gy[f] into a gradient buffer with atomics (float or double: half params accumulate in float).
template <typename S, typename G>
struct AtomicAcc {
    G* buf;
    __device__ __forceinline__ void operator()(int64_t i, S w, const S* gy, int F) const {
        for (int f = 0; f < F; ++f) atomicAdd(buf + i + f, static_cast<G>(w * gy[f]));
    }
};

}  // namespace cuda
}  // namespace fastdream
