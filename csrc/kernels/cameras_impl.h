// Camera geometry, written once for CPU and CUDA: DreamFusion's orbit cameras from their uniform draws (one
// work item per camera; fastdream.ops.cameras.orbit_cameras_reference) and pinhole rays through pixel
// centres (one work item per pixel; camera_rays_reference). World y-up; camera frames follow OpenGL (the
// camera looks down -z, +y is up in the image). Matrices are row-major 4x4.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace cam {

// low + u * span: a uniform draw u in [0, 1) scaled to its range (torch.addcmul's two roundings).
template <typename S>
FD_HOST_DEVICE FD_INLINE S uniform_in(S u, S low, S span) {
    return add_rn(low, mul_rn(u, span));
}

// Python's a % 360 (torch.remainder): the result takes the divisor's sign, so it lies in [0, 360).
template <typename S>
FD_HOST_DEVICE FD_INLINE S wrap_degrees(S a) {
    S m = fd_fmod(a, S(360));
    if (m != S(0) && m < S(0)) m += S(360);
    return m;
}

// Camera-to-world of a camera at (elevation, azimuth) degrees and `distance` looking at the origin. With e, a
// the angles the columns are right = (cos a, 0, -sin a), up = (-sin e sin a, cos e, -sin e cos a), back =
// (cos e sin a, sin e, cos e cos a) (toward the camera) and the position distance * back: the image x-axis
// is the orbit's horizontal tangent, so the frame stays defined straight overhead.
template <typename S>
FD_HOST_DEVICE FD_INLINE void orbit_c2w(S elevation, S azimuth, S distance, S* m) {
    const S to_rad = S(3.14159265358979323846 / 180.0);
    const S e = mul_rn(elevation, to_rad), a = mul_rn(azimuth, to_rad);
    const S se = fd_sin(e), ce = fd_cos(e), sa = fd_sin(a), ca = fd_cos(a);
    const S back_x = mul_rn(ce, sa), back_z = mul_rn(ce, ca);
    m[0] = ca, m[1] = mul_rn(-se, sa), m[2] = back_x, m[3] = mul_rn(back_x, distance);
    m[4] = S(0), m[5] = ce, m[6] = se, m[7] = mul_rn(se, distance);
    m[8] = -sa, m[9] = mul_rn(-se, ca), m[10] = back_z, m[11] = mul_rn(back_z, distance);
    m[12] = S(0), m[13] = S(0), m[14] = S(0), m[15] = S(1);
}

// v / max(|v|, 1e-12) (torch.nn.functional.normalize) in place.
template <typename S>
FD_HOST_DEVICE FD_INLINE void normalize3(S* v) {
    const S n = fd_max(fd_sqrt(add_rn(add_rn(mul_rn(v[0], v[0]), mul_rn(v[1], v[1])), mul_rn(v[2], v[2]))), S(1e-12));
    v[0] = div_rn(v[0], n), v[1] = div_rn(v[1], n), v[2] = div_rn(v[2], n);
}

// The point light of an orbit camera: `light_distance` along the unit direction toward the camera (the
// c2w's back column) jittered by perturb * noise.
template <typename S>
FD_HOST_DEVICE FD_INLINE void orbit_light(const S* c2w, const S* noise, S perturb, S light_distance, S* light) {
    for (int k = 0; k < 3; ++k) light[k] = add_rn(c2w[4 * k + 2], mul_rn(noise[k], perturb));
    normalize3(light);
    for (int k = 0; k < 3; ++k) light[k] = mul_rn(light[k], light_distance);
}

// The diffuse light left once the ambient share is taken: intensity * max(1 - ambient, 0), so that ambient +
// diffuse <= 1.
template <typename S>
FD_HOST_DEVICE FD_INLINE S diffuse_intensity(S intensity, S ambient) {
    return mul_rn(intensity, fd_max(sub_rn(S(1), ambient), S(0)));
}

// The pinhole ray through the centre of pixel (x, y) (column, row): camera-space direction (u, -v, -1) with
// u = (x + 0.5 - cx) / fx, v = (y + 0.5 - cy) / fy, rotated by c2w and normalised; the origin is the
// camera's position.
template <typename S>
FD_HOST_DEVICE FD_INLINE void pixel_ray(const S* c2w, S fx, S fy, S cx, S cy, int64_t x, int64_t y, S* origin,
                                        S* direction) {
    const S u = div_rn(sub_rn(add_rn(S(x), S(0.5)), cx), fx);
    const S minus_v = div_rn(sub_rn(add_rn(S(y), S(0.5)), cy), -fy);
    for (int k = 0; k < 3; ++k) {
        const S* row = c2w + 4 * k;
        direction[k] = sub_rn(add_rn(mul_rn(row[0], u), mul_rn(row[1], minus_v)), row[2]);
        origin[k] = row[3];
    }
    normalize3(direction);
}

}  // namespace cam
}  // namespace fastdream
