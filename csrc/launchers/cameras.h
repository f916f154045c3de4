// Launchers of the camera ops, written once for both extensions (see fastdream/parallel_for.h):
// orbit_cameras (one work item per camera: its parameters scaled from the uniform draws, its c2w and its
// point light) and camera_rays (one work item per pixel: its pinhole ray and its camera's lights). Included
// by csrc/cpu/ops_cpu.cpp and csrc/cuda/cameras.cu, which register them for CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "fastdream/parallel_for.h"
#include "fastdream/torch_glue.h"
#include "../kernels/cameras_impl.h"

namespace fastdream {
namespace {

constexpr int64_t kOrbitCameraGrain = 64;    // cameras per CPU task
constexpr int64_t kCameraRayGrain = 4096;     // camera rays per CPU task

constexpr int kOrbitFields = 9;  // the per-camera (B,) outputs of orbit_cameras

template <typename S>
struct FieldPointers {  // captured by value by the per-camera lambda
    S* f[kOrbitFields];
};

using OrbitCameras = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The seven uniform draws (camera_u (4, B): elevation, azimuth, distance, focal; light_u (3, B): light
// distance, intensity, ambient) scaled to low + u * span, and the (B, 3) light jitter -> a CameraBatch's
// tensors: c2w (B, 4, 4), fx, fy, cx, cy, elevation, azimuth, distance (B,), light_position (B, 3),
// light_intensity (diffuse share), ambient (B,).
OrbitCameras orbit_cameras(const at::Tensor& camera_u_, const at::Tensor& light_u_, const at::Tensor& light_noise_,
                           const at::Tensor& lows_, const at::Tensor& spans_, int64_t width, int64_t height,
                           double light_perturb, bool wrap_azimuth) {
    check_same_device("orbit_cameras", {camera_u_, light_u_, light_noise_, lows_, spans_});
    TORCH_CHECK(camera_u_.dim() == 2 && camera_u_.size(0) == 4, "orbit_cameras: camera_u must be (4, B)");
    const int64_t B = camera_u_.size(1);
    TORCH_CHECK(light_u_.dim() == 2 && light_u_.size(0) == 3 && light_u_.size(1) == B,
                "orbit_cameras: light_u must be (3, B) like camera_u");
    TORCH_CHECK(light_noise_.dim() == 2 && light_noise_.size(0) == B && light_noise_.size(1) == 3,
                "orbit_cameras: light_noise must be (B, 3)");
    TORCH_CHECK(lows_.numel() == 7 && spans_.numel() == 7, "orbit_cameras: lows and spans must have 7 values");
    TORCH_CHECK(camera_u_.scalar_type() == at::kFloat || camera_u_.scalar_type() == at::kDouble,
                "orbit_cameras: camera_u must be float32 or float64");
    DeviceGuard guard(camera_u_.device());
    const auto dt = camera_u_.scalar_type();
    auto camera_u = camera_u_.contiguous(), light_u = light_u_.to(dt).contiguous();
    auto light_noise = light_noise_.to(dt).contiguous();
    auto lows = lows_.to(dt).reshape({7}).contiguous(), spans = spans_.to(dt).reshape({7}).contiguous();
    auto opts = camera_u.options();
    auto c2w = at::empty({B, 4, 4}, opts), light = at::empty({B, 3}, opts);
    at::Tensor fields[kOrbitFields];  // fx fy cx cy elevation azimuth distance light_intensity ambient
    for (auto& f : fields) f = at::empty({B}, opts);
    AT_DISPATCH_FLOATING_TYPES(dt, "orbit_cameras", [&] {
        using S = scalar_t;
        const S *cu = camera_u.data_ptr<S>(), *lu = light_u.data_ptr<S>(), *nz = light_noise.data_ptr<S>();
        const S *lo = lows.data_ptr<S>(), *sp = spans.data_ptr<S>();
        S *m = c2w.data_ptr<S>(), *li = light.data_ptr<S>();
        FieldPointers<S> p;
        for (int k = 0; k < kOrbitFields; ++k) p.f[k] = fields[k].data_ptr<S>();
        const S perturb = static_cast<S>(light_perturb), half_w = S(0.5) * S(width), half_h = S(0.5) * S(height);
        const bool wrap = wrap_azimuth;
        parallel_for(B, kOrbitCameraGrain, [=] FD_LAMBDA(int64_t b) {
            const S elevation = cam::uniform_in(cu[b], lo[0], sp[0]);
            S azimuth = cam::uniform_in(cu[B + b], lo[1], sp[1]);
            if (wrap) azimuth = cam::wrap_degrees(azimuth);
            const S distance = cam::uniform_in(cu[2 * B + b], lo[2], sp[2]);
            const S focal = cam::uniform_in(cu[3 * B + b], lo[3], sp[3]);
            const S light_distance = cam::uniform_in(lu[b], lo[4], sp[4]);
            const S intensity = cam::uniform_in(lu[B + b], lo[5], sp[5]);
            const S ambient = cam::uniform_in(lu[2 * B + b], lo[6], sp[6]);
            cam::orbit_c2w(elevation, azimuth, distance, m + 16 * b);
            cam::orbit_light(m + 16 * b, nz + 3 * b, perturb, light_distance, li + 3 * b);
            p.f[0][b] = focal, p.f[1][b] = focal, p.f[2][b] = half_w, p.f[3][b] = half_h;
            p.f[4][b] = elevation, p.f[5][b] = azimuth, p.f[6][b] = distance;
            p.f[7][b] = cam::diffuse_intensity(intensity, ambient), p.f[8][b] = ambient;
        });
    });
    return {c2w, fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6], light, fields[7], fields[8]};
}

// Per pixel (R = B * height * width, row-major per camera): origins, unit directions, light positions (R, 3),
// light intensity and ambient (R,), the last three copied from the pixel's camera.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> camera_rays(
    const at::Tensor& c2w_, const at::Tensor& fx_, const at::Tensor& fy_, const at::Tensor& cx_, const at::Tensor& cy_,
    const at::Tensor& light_position_, const at::Tensor& light_intensity_, const at::Tensor& ambient_, int64_t height,
    int64_t width) {
    check_same_device("camera_rays", {c2w_, fx_, fy_, cx_, cy_, light_position_, light_intensity_, ambient_});
    TORCH_CHECK(c2w_.dim() == 3 && c2w_.size(1) == 4 && c2w_.size(2) == 4, "camera_rays: c2w must be (B, 4, 4)");
    TORCH_CHECK(c2w_.scalar_type() == at::kFloat || c2w_.scalar_type() == at::kDouble,
                "camera_rays: c2w must be float32 or float64");
    const int64_t B = c2w_.size(0);
    for (const at::Tensor* t : {&fx_, &fy_, &cx_, &cy_, &light_intensity_, &ambient_})
        TORCH_CHECK(t->numel() == B, "camera_rays: fx, fy, cx, cy, light_intensity and ambient need one value per camera");
    TORCH_CHECK(light_position_.numel() == 3 * B, "camera_rays: light_position must be (B, 3)");
    TORCH_CHECK(height >= 0 && width >= 0, "camera_rays: height and width must be >= 0");
    DeviceGuard guard(c2w_.device());
    const auto dt = c2w_.scalar_type();
    auto per_camera = [&](const at::Tensor& t) { return t.to(dt).contiguous(); };
    auto c2w = c2w_.contiguous(), fx = per_camera(fx_), fy = per_camera(fy_), cx = per_camera(cx_);
    auto cy = per_camera(cy_), light_position = per_camera(light_position_);
    auto light_intensity = per_camera(light_intensity_), ambient = per_camera(ambient_);
    const int64_t P = height * width, R = B * P;
    auto opts = c2w.options();
    auto origins = at::empty({R, 3}, opts), directions = at::empty({R, 3}, opts);
    auto ray_lights = at::empty({R, 3}, opts), ray_intensity = at::empty({R}, opts), ray_ambient = at::empty({R}, opts);
    AT_DISPATCH_FLOATING_TYPES(dt, "camera_rays", [&] {
        using S = scalar_t;
        const S *m = c2w.data_ptr<S>(), *fxp = fx.data_ptr<S>(), *fyp = fy.data_ptr<S>(), *cxp = cx.data_ptr<S>();
        const S *cyp = cy.data_ptr<S>(), *lp = light_position.data_ptr<S>(), *lip = light_intensity.data_ptr<S>();
        const S* amp = ambient.data_ptr<S>();
        S *o = origins.data_ptr<S>(), *d = directions.data_ptr<S>(), *rl = ray_lights.data_ptr<S>();
        S *ri = ray_intensity.data_ptr<S>(), *ra = ray_ambient.data_ptr<S>();
        const int64_t W = width;
        parallel_for(R, kCameraRayGrain, [=] FD_LAMBDA(int64_t i) {
            const int64_t b = i / P, pixel = i - b * P;
            cam::pixel_ray(m + 16 * b, fxp[b], fyp[b], cxp[b], cyp[b], pixel % W, pixel / W, o + 3 * i, d + 3 * i);
            for (int k = 0; k < 3; ++k) rl[3 * i + k] = lp[3 * b + k];
            ri[i] = lip[b];
            ra[i] = amp[b];
        });
    });
    return {origins, directions, ray_lights, ray_intensity, ray_ambient};
}

}  // namespace
}  // namespace fastdream
