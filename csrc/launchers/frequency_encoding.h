// Launcher of the frequency encoding (frequency_encode), written once for both extensions (see
// fastdream/parallel_for.h): one work item per point. Included by csrc/cpu/ops_cpu.cpp and
// csrc/cuda/frequency_encoding.cu, which register it for CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include "fastdream/parallel_for.h"
#include "../kernels/frequency_encoding_impl.h"

namespace fastdream {
namespace {

constexpr int64_t kEncodePointGrain = 1024;  // points per CPU task

// x (N, D) -> (N, D * (1 + 2F)): [x, sines, cosines] (see kernels/frequency_encoding_impl.h).
at::Tensor frequency_encode(const at::Tensor& x_, int64_t n_frequencies) {
    TORCH_CHECK(x_.dim() == 2, "frequency_encode: x must be (N, D)");
    TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble,
                "frequency_encode: x must be float32 or float64");
    TORCH_CHECK(n_frequencies >= 0 && n_frequencies <= 64, "frequency_encode: n_frequencies must be in [0, 64]");
    DeviceGuard guard(x_.device());
    auto x = x_.contiguous();
    const int64_t N = x.size(0), D = x.size(1), width = freq::encoded_width(D, n_frequencies);
    auto out = at::empty({N, width}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "frequency_encode", [&] {
        using S = scalar_t;
        const S* xp = x.data_ptr<S>();
        S* o = out.data_ptr<S>();
        const int64_t F = n_frequencies;
        parallel_for(N, kEncodePointGrain, [=] FD_LAMBDA(int64_t i) {
            freq::encode_point(xp + i * D, D, F, o + i * width);
        });
    });
    return out;
}

}  // namespace
}  // namespace fastdream
