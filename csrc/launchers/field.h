// Launchers of the per-point field ops (kernels/field_impl.h), written once for both extensions (see
// fastdream/parallel_for.h), one work item per sample or point: ray_points (sample midpoints), probe_points
// (hash-grid inputs of points and their probes) and field_head_fwd/bwd (density, albedo and normals from the
// MLP's raw output, and back). Included by csrc/cpu/ops_cpu.cpp and csrc/cuda/field.cu, which register them
// for CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include "fastdream/parallel_for.h"
#include "fastdream/torch_glue.h"
#include "../kernels/field_impl.h"

namespace fastdream {
namespace {

constexpr int64_t kFieldPointGrain = 2048;  // points per CPU task

inline void check_points(const char* op, const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == 3, op, ": ", name, " must be (", n, ", 3), got ",
                t.sizes());
}

inline void check_float_like(const char* op, const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must be ", like.scalar_type(), ", got ",
                t.scalar_type());
}

at::Tensor ray_points(const at::Tensor& origins_, const at::Tensor& directions_, const at::Tensor& ray_indices_,
                      const at::Tensor& t_starts_, const at::Tensor& t_ends_) {
    const char* op = "ray_points";
    check_same_device(op, {origins_, directions_, ray_indices_, t_starts_, t_ends_});
    TORCH_CHECK(origins_.scalar_type() == at::kFloat || origins_.scalar_type() == at::kDouble, op,
                ": origins must be float32 or float64");
    const int64_t R = origins_.size(0), N = t_starts_.numel();
    check_points(op, origins_, R, "origins");
    check_points(op, directions_, R, "directions");
    TORCH_CHECK(ray_indices_.dim() == 1 && ray_indices_.numel() == N && ray_indices_.scalar_type() == at::kLong, op,
                ": ray_indices must be (N,) int64 like t_starts");
    TORCH_CHECK(t_starts_.dim() == 1 && t_ends_.sizes() == t_starts_.sizes(), op, ": t_starts and t_ends must be (N,)");
    for (const auto* t : {&directions_, &t_starts_, &t_ends_}) check_float_like(op, *t, origins_, "every float tensor");
    DeviceGuard guard(origins_.device());
    auto origins = origins_.contiguous(), directions = directions_.contiguous(), ri = ray_indices_.contiguous();
    auto ts = t_starts_.contiguous(), te = t_ends_.contiguous();
    auto out = at::empty({N, 3}, origins.options());
    AT_DISPATCH_FLOATING_TYPES(origins.scalar_type(), "ray_points", [&] {
        using S = scalar_t;
        const S *o = origins.data_ptr<S>(), *d = directions.data_ptr<S>(), *s = ts.data_ptr<S>(), *e = te.data_ptr<S>();
        const int64_t* r = ri.data_ptr<int64_t>();
        S* p = out.data_ptr<S>();
        parallel_for(N, kFieldPointGrain, [=] FD_LAMBDA(int64_t i) { field::ray_point(i, o, d, r, s, e, p); });
    });
    return out;
}

at::Tensor probe_points(const at::Tensor& x_, const at::Tensor& unit_scale_, const at::Tensor& unit_offset_,
                        double step, int64_t k) {
    const char* op = "probe_points";
    check_same_device(op, {x_, unit_scale_, unit_offset_});
    TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, op, ": x must be float32 or float64");
    TORCH_CHECK(k == 1 || k == field::kProbes, op, ": k must be 1 or 7, got ", k);
    const int64_t N = x_.size(0);
    check_points(op, x_, N, "x");
    TORCH_CHECK(unit_scale_.numel() == 3 && unit_offset_.numel() == 3, op, ": unit_scale and unit_offset need 3 values");
    check_float_like(op, unit_scale_, x_, "unit_scale");
    check_float_like(op, unit_offset_, x_, "unit_offset");
    DeviceGuard guard(x_.device());
    auto x = x_.contiguous(), scale = unit_scale_.contiguous(), offset = unit_offset_.contiguous();
    auto out = at::empty({N * k, 3}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "probe_points", [&] {
        using S = scalar_t;
        const S *xp = x.data_ptr<S>(), *sc = scale.data_ptr<S>(), *of = offset.data_ptr<S>();
        S* p = out.data_ptr<S>();
        const S st = static_cast<S>(step);
        const int K = static_cast<int>(k);
        parallel_for(N * K, kFieldPointGrain, [=] FD_LAMBDA(int64_t j) {
            field::probe_unit_point(j / K, static_cast<int>(j % K), K, xp, sc, of, st, p);
        });
    });
    return out;
}

// Checks shared by the head's forward and backward; returns K.
inline int64_t check_head(const char* op, const at::Tensor& raw, const at::Tensor& x, const at::Tensor& centre,
                          int64_t k, int64_t blob_shape, int64_t activation) {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": x must be float32 or float64");
    TORCH_CHECK(k == 1 || k == field::kProbes, op, ": k must be 1 or 7, got ", k);
    const int64_t N = x.size(0);
    check_points(op, x, N, "x");
    TORCH_CHECK(raw.dim() == 2 && raw.size(0) == N * k && raw.size(1) == 4, op, ": raw must be (", N * k,
                ", 4), got ", raw.sizes());
    TORCH_CHECK(centre.numel() == 3, op, ": centre needs 3 values");
    check_float_like(op, raw, x, "raw");
    check_float_like(op, centre, x, "centre");
    TORCH_CHECK(blob_shape >= field::kNoBlob && blob_shape <= field::kGaussianBlob, op, ": bad blob_shape ", blob_shape);
    TORCH_CHECK(activation == field::kTruncExp || activation == field::kSoftplus, op, ": bad activation ", activation);
    return k;
}

template <typename S>
field::HeadParams<S> head_params(const S* centre, double step, double density_bias, double blob_density,
                                 double blob_radius, int64_t blob_shape, int64_t activation, int64_t k) {
    // The blob constants in double, then rounded once, as the twin's Python floats are.
    const int shape = blob_density > 0 ? static_cast<int>(blob_shape) : static_cast<int>(field::kNoBlob);
    return {centre, static_cast<S>(step), static_cast<S>(density_bias),
            static_cast<S>(blob_density), static_cast<S>(-blob_density / blob_radius),
            static_cast<S>(2 * blob_radius * blob_radius), static_cast<S>(1e-12 * 2 * step), shape,
            static_cast<int>(activation), static_cast<int>(k)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> field_head_fwd(const at::Tensor& raw_, const at::Tensor& x_,
                                                              const at::Tensor& centre_, int64_t k, double step,
                                                              double density_bias, double blob_density,
                                                              double blob_radius, int64_t blob_shape,
                                                              int64_t activation, bool with_albedo) {
    const char* op = "field_head_fwd";
    check_same_device(op, {raw_, x_, centre_});
    check_head(op, raw_, x_, centre_, k, blob_shape, activation);
    DeviceGuard guard(x_.device());
    auto raw = raw_.contiguous(), x = x_.contiguous(), centre = centre_.contiguous();
    const int64_t N = x.size(0);
    auto sigma = at::empty({N}, x.options());
    auto albedo = with_albedo ? at::empty({N, 3}, x.options()) : at::empty({0}, x.options());
    auto normals = k == field::kProbes ? at::empty({N, 3}, x.options()) : at::empty({0}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "field_head_fwd", [&] {
        using S = scalar_t;
        const auto p = head_params<S>(centre.data_ptr<S>(), step, density_bias, blob_density, blob_radius, blob_shape,
                                      activation, k);
        const S *r = raw.data_ptr<S>(), *xp = x.data_ptr<S>();
        S *sg = sigma.data_ptr<S>(), *al = with_albedo ? albedo.data_ptr<S>() : nullptr;
        S* nm = k == field::kProbes ? normals.data_ptr<S>() : nullptr;
        parallel_for(N, kFieldPointGrain, [=] FD_LAMBDA(int64_t i) { field::head_forward(p, i, r, xp, sg, al, nm); });
    });
    return {sigma, albedo, normals};
}

at::Tensor field_head_bwd(const c10::optional<at::Tensor>& g_sigma_, const c10::optional<at::Tensor>& g_albedo_,
                          const c10::optional<at::Tensor>& g_normals_, const at::Tensor& raw_, const at::Tensor& x_,
                          const at::Tensor& centre_, int64_t k, double step, double density_bias, double blob_density,
                          double blob_radius, int64_t blob_shape, int64_t activation) {
    const char* op = "field_head_bwd";
    const at::Tensor gs_ = or_undefined(g_sigma_), ga_ = or_undefined(g_albedo_), gn_ = or_undefined(g_normals_);
    check_same_device(op, {gs_, ga_, gn_, raw_, x_, centre_});
    check_head(op, raw_, x_, centre_, k, blob_shape, activation);
    const int64_t N = x_.size(0);
    // an empty gradient is an unused output (albedo not asked for, no normals with K = 1): zero
    const bool has_s = gs_.defined() && gs_.numel() > 0, has_a = ga_.defined() && ga_.numel() > 0;
    const bool has_n = gn_.defined() && gn_.numel() > 0 && k == field::kProbes;
    if (has_s) TORCH_CHECK(gs_.numel() == N, op, ": g_sigma must have ", N, " values");
    if (has_a) check_points(op, ga_, N, "g_albedo");
    if (has_n) check_points(op, gn_, N, "g_normals");
    DeviceGuard guard(x_.device());
    auto raw = raw_.contiguous(), x = x_.contiguous(), centre = centre_.contiguous();
    const auto dt = x.scalar_type();
    auto gs = has_s ? gs_.to(dt).contiguous() : at::Tensor(), ga = has_a ? ga_.to(dt).contiguous() : at::Tensor();
    auto gn = has_n ? gn_.to(dt).contiguous() : at::Tensor();
    auto g_raw = at::empty({N * k, 4}, x.options());
    AT_DISPATCH_FLOATING_TYPES(dt, "field_head_bwd", [&] {
        using S = scalar_t;
        const auto p = head_params<S>(centre.data_ptr<S>(), step, density_bias, blob_density, blob_radius, blob_shape,
                                      activation, k);
        const S *r = raw.data_ptr<S>(), *xp = x.data_ptr<S>();
        const S *gsp = has_s ? gs.data_ptr<S>() : nullptr, *gap = has_a ? ga.data_ptr<S>() : nullptr;
        const S* gnp = has_n ? gn.data_ptr<S>() : nullptr;
        S* g = g_raw.data_ptr<S>();
        parallel_for(N, kFieldPointGrain, [=] FD_LAMBDA(int64_t i) {
            field::head_backward(p, i, gsp, gap, gnp, r, xp, g);
        });
    });
    return g_raw;
}

}  // namespace
}  // namespace fastdream
