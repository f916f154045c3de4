// Host-side glue shared by the CPU and CUDA launchers: argument checks and grid metadata.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include "../../kernels/hash_encoding_impl.h"

namespace fastdream {

#define FD_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

inline hashgrid::GridMeta make_grid_meta(c10::ArrayRef<double> scales, c10::IntArrayRef resolutions,
                                         c10::IntArrayRef offsets, c10::IntArrayRef hashed, int64_t n_features) {
    const int64_t L = static_cast<int64_t>(scales.size());
    TORCH_CHECK(L >= 1 && L <= hashgrid::kMaxLevels, "hash_encode: n_levels must be in [1, ", hashgrid::kMaxLevels,
                "], got ", L);
    TORCH_CHECK(static_cast<int64_t>(resolutions.size()) == L && static_cast<int64_t>(hashed.size()) == L &&
                    static_cast<int64_t>(offsets.size()) == L + 1,
                "hash_encode: scales/resolutions/hashed need n_levels entries and offsets n_levels + 1");
    TORCH_CHECK(n_features >= 1 && n_features <= 8, "hash_encode: n_features must be in [1, 8]");
    hashgrid::GridMeta m{};
    m.n_levels = static_cast<int>(L);
    m.n_features = static_cast<int>(n_features);
    for (int64_t l = 0; l < L; ++l) {
        int64_t size = offsets[l + 1] - offsets[l];
        TORCH_CHECK(size >= 1 && size <= (int64_t(1) << 31), "hash_encode: bad table size ", size, " at level ", l);
        m.scale[l] = static_cast<float>(scales[l]);
        m.resolution[l] = static_cast<uint32_t>(resolutions[l]);
        m.size[l] = static_cast<uint32_t>(size);
        m.offset[l] = offsets[l];
        m.hashed[l] = hashed[l] ? 1 : 0;
    }
    return m;
}

inline int64_t grid_n_params(c10::IntArrayRef offsets, int64_t n_features) {
    return offsets[offsets.size() - 1] * n_features;
}

inline void check_hash_inputs(const at::Tensor& x, const at::Tensor& params, c10::IntArrayRef offsets,
                              int64_t n_features) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == 3, "hash_encode: x must be (N, 3)");
    TORCH_CHECK(params.dim() == 1 && params.numel() == grid_n_params(offsets, n_features),
                "hash_encode: params must be flat with n_params values");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "hash_encode: x must be float32 or float64");
    if (x.scalar_type() == at::kFloat) {
        TORCH_CHECK(params.scalar_type() == at::kFloat || params.scalar_type() == at::kHalf,
                    "hash_encode: with float32 x, params must be float32 or float16");
    } else {
        TORCH_CHECK(params.scalar_type() == at::kDouble, "hash_encode: with float64 x, params must be float64");
    }
    TORCH_CHECK(x.device() == params.device(), "hash_encode: x and params must be on the same device");
}

// Parameter-gradient accumulation buffer dtype: the compute dtype (float for float/half params).
inline at::ScalarType grad_accum_dtype(const at::Tensor& x) { return x.scalar_type(); }

}  // namespace fastdream
