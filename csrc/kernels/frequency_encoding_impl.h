// NeRF's frequency (positional) encoding of one point, written once for CPU and CUDA (the background model
// encodes ray directions with it): [x, sin(2^k pi x_c), cos(2^k pi x_c)], the sines and the cosines each
// ordered by component c, then by frequency k (fastdream.ops.frequency_encoding.frequency_encode_reference).
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace freq {

FD_HOST_DEVICE FD_INLINE void sincos_of(float v, float* s, float* c) { *s = sinf(v), *c = cosf(v); }
FD_HOST_DEVICE FD_INLINE void sincos_of(double v, double* s, double* c) { *s = sin(v), *c = cos(v); }

// Width of the encoding of a point with `dims` components.
FD_HOST_DEVICE FD_INLINE int64_t encoded_width(int64_t dims, int64_t n_frequencies) {
    return dims * (1 + 2 * n_frequencies);
}

// x (dims values) -> out (encoded_width values). The frequency 2^k pi is pi rounded to S, times 2^k (exact),
// as the reference's 2.0 ** arange(F) * pi; each angle is one rounded product.
template <typename S>
FD_HOST_DEVICE FD_INLINE void encode_point(const S* x, int64_t dims, int64_t n_frequencies, S* out) {
    const S pi = S(3.14159265358979323846);
    const int64_t block = dims * n_frequencies;
    for (int64_t c = 0; c < dims; ++c) {
        out[c] = x[c];
        S frequency = pi;
        for (int64_t k = 0; k < n_frequencies; ++k, frequency = frequency * S(2)) {
            sincos_of(mul_rn(x[c], frequency), out + dims + c * n_frequencies + k,
                      out + dims + block + c * n_frequencies + k);
        }
    }
}

}  // namespace freq
}  // namespace fastdream
