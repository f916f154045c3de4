// CPU launchers: OpenMP (through at::parallel_for) over points / levels / rays around the shared
// per-element logic in csrc/kernels/*_impl.h; the volume-rendering, pruning and rasterization launchers
// are shared with CUDA (csrc/launchers/). No atomics: the hash-grid parameter gradient is
// partitioned by level, so each thread owns a disjoint slice of the gradient buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fastdream/torch_glue.h"
#include "../kernels/compositing_impl.h"
#include "../kernels/marching_impl.h"
#include "../launchers/cameras.h"           // orbit_cameras, camera_rays (shared with CUDA)
#include "../launchers/frequency_encoding.h"  // frequency_encode (shared with CUDA)
#include "../launchers/pruning.h"           // compact_visible_samples (shared with CUDA)
#include "../launchers/rasterize.h"         // rasterize, interpolate, antialias (shared with CUDA)
#include "../launchers/volume_rendering.h"  // render_weights_fwd/bwd, composite_fwd/bwd (shared with CUDA)

namespace fastdream {
namespace {

using hashgrid::GridMeta;

constexpr int64_t kPointGrain = 512;
constexpr int64_t kRayGrain = 64;

template <typename S>
struct PlainAcc {
    S* buf;
    inline void operator()(int64_t i, S w, const S* gy, int F) const {
        for (int f = 0; f < F; ++f) buf[i + f] += w * gy[f];
    }
};

// ------------------------------------------------------------------ hash encoding
at::Tensor hash_encode_fwd_cpu(const at::Tensor& x_, const at::Tensor& params_, c10::ArrayRef<double> scales,
                               c10::IntArrayRef resolutions, c10::IntArrayRef offsets, c10::IntArrayRef hashed,
                               int64_t n_features) {
    check_same_device("hash_encode_fwd", {x_, params_});
    check_hash_inputs(x_, params_, offsets, n_features);
    const GridMeta m = make_grid_meta(scales, resolutions, offsets, hashed, n_features);
    auto x = x_.contiguous();
    auto params = params_.contiguous();
    const int64_t N = x.size(0), L = m.n_levels, F = m.n_features;
    auto y = at::empty({N, L * F}, x.options());
    FD_DISPATCH_HASH_TYPES(x, params, at::Half, [&] {
        {
            const S* xp = x.data_ptr<S>();
            const P* pp = params.data_ptr<P>();
            S* yp = y.data_ptr<S>();
            FD_DISPATCH_N_FEATURES(F, [&] {
                // Level-major inside each thread's block of points: one level's table (<= 2^19 entries)
                // stays in cache while the block walks it, instead of all levels competing for it.
                at::parallel_for(0, N, kPointGrain, [&](int64_t b, int64_t e) {
                    for (int l = 0; l < L; ++l)
                        for (int64_t n = b; n < e; ++n)
                            hashgrid::encode_level<kF>(m, l, xp + 3 * n, pp, yp + n * L * F + l * F);
                });
            });
        }
    });
    return y;
}

// Accumulates the params gradient race-free: each thread takes whole levels. parallel_for hands
// out contiguous ranges, so levels are visited in zigzag order (0, L-1, 1, L-2, ...): coarse levels
// (small, cache-resident tables) and fine ones (hashed, cache-missing) are then shared evenly.
template <typename S, typename Fn>
void for_levels_points(const GridMeta& m, int64_t N, Fn&& fn) {
    const int64_t L = m.n_levels;
    at::parallel_for(0, L, 1, [&](int64_t ib, int64_t ie) {
        for (int64_t i = ib; i < ie; ++i) {
            const int64_t l = (i % 2 == 0) ? i / 2 : L - 1 - i / 2;
            for (int64_t n = 0; n < N; ++n) fn(static_cast<int>(l), n);
        }
    });
}

at::Tensor finish_params_grad(const at::Tensor& acc, const at::Tensor& params) {
    return acc.scalar_type() == params.scalar_type() ? acc : acc.to(params.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> hash_encode_bwd_cpu(const at::Tensor& grad_y_, const at::Tensor& x_,
                                                       const at::Tensor& params_, c10::ArrayRef<double> scales,
                                                       c10::IntArrayRef resolutions, c10::IntArrayRef offsets,
                                                       c10::IntArrayRef hashed, int64_t n_features,
                                                       bool need_params_grad, bool need_x_grad) {
    check_same_device("hash_encode_bwd", {grad_y_, x_, params_});
    check_hash_inputs(x_, params_, offsets, n_features);
    const GridMeta m = make_grid_meta(scales, resolutions, offsets, hashed, n_features);
    auto x = x_.contiguous();
    auto params = params_.contiguous();
    auto gy = grad_y_.to(x.scalar_type()).contiguous();
    const int64_t N = x.size(0), L = m.n_levels, F = m.n_features;
    TORCH_CHECK(gy.dim() == 2 && gy.size(0) == N && gy.size(1) == L * F, "hash_encode_bwd: grad_y must be (N, L*F)");
    at::Tensor gparams = need_params_grad ? at::zeros({params.numel()}, x.options()) : at::empty({0}, params.options());
    at::Tensor gx = need_x_grad ? at::zeros({N, 3}, x.options()) : at::empty({0}, x.options());
    FD_DISPATCH_HASH_TYPES(x, params, at::Half, [&] {
        {
            const S* xp = x.data_ptr<S>();
            const S* gyp = gy.data_ptr<S>();
            const P* pp = params.data_ptr<P>();
            if (need_params_grad && N > 0) {
                PlainAcc<S> acc{gparams.data_ptr<S>()};
                FD_DISPATCH_N_FEATURES(F, [&] {
                    for_levels_points<S>(m, N, [&](int l, int64_t n) {
                        hashgrid::encode_level_backward_params<kF>(m, l, xp + 3 * n, gyp + n * L * F + l * F, acc);
                    });
                });
            }
            if (need_x_grad && N > 0) {
                S* gxp = gx.data_ptr<S>();
                FD_DISPATCH_N_FEATURES(F, [&] {
                    at::parallel_for(0, N, kPointGrain, [&](int64_t b, int64_t e) {
                        for (int l = 0; l < L; ++l)  // level-major for cache locality, as in the forward
                            for (int64_t n = b; n < e; ++n)
                                hashgrid::encode_level_backward_x<kF>(m, l, xp + 3 * n, gyp + n * L * F + l * F, pp,
                                                                      gxp + 3 * n);
                    });
                });
            }
        }
    });
    if (need_params_grad) gparams = finish_params_grad(gparams, params);
    return {gparams, gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hash_encode_bwd_bwd_cpu(
    const at::Tensor& ggx_, const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& params_,
    c10::ArrayRef<double> scales, c10::IntArrayRef resolutions, c10::IntArrayRef offsets, c10::IntArrayRef hashed,
    int64_t n_features, bool need_params_grad, bool need_x_grad) {
    check_same_device("hash_encode_bwd_bwd", {ggx_, grad_y_, x_, params_});
    check_hash_inputs(x_, params_, offsets, n_features);
    const GridMeta m = make_grid_meta(scales, resolutions, offsets, hashed, n_features);
    auto x = x_.contiguous();
    auto params = params_.contiguous();
    auto gy = grad_y_.to(x.scalar_type()).contiguous();
    auto ggx = ggx_.to(x.scalar_type()).contiguous();
    const int64_t N = x.size(0), L = m.n_levels, F = m.n_features;
    TORCH_CHECK(gy.dim() == 2 && gy.size(0) == N && gy.size(1) == L * F, "hash_encode_bwd_bwd: grad_y must be (N, L*F)");
    TORCH_CHECK(ggx.dim() == 2 && ggx.size(0) == N && ggx.size(1) == 3, "hash_encode_bwd_bwd: ggx must be (N, 3)");
    at::Tensor ggy = at::empty({N, L * F}, x.options());
    at::Tensor gparams = need_params_grad ? at::zeros({params.numel()}, x.options()) : at::empty({0}, params.options());
    at::Tensor gx = need_x_grad ? at::zeros({N, 3}, x.options()) : at::empty({0}, x.options());
    FD_DISPATCH_HASH_TYPES(x, params, at::Half, [&] {
        {
            const S* xp = x.data_ptr<S>();
            const S* gyp = gy.data_ptr<S>();
            const S* ggxp = ggx.data_ptr<S>();
            const P* pp = params.data_ptr<P>();
            S* ggyp = ggy.data_ptr<S>();
            // pass 1 (points in parallel): ggy and the second-order x term
            at::parallel_for(0, N, kPointGrain, [&](int64_t b, int64_t e) {
                S scratch[3];
                for (int64_t n = b; n < e; ++n) {
                    S* gx2 = need_x_grad ? gx.data_ptr<S>() + 3 * n : scratch;
                    for (int l = 0; l < L; ++l)
                        hashgrid::encode_level_backward_backward<0, S, P, PlainAcc<S>>(
                            m, l, xp + 3 * n, gyp + n * L * F + l * F, ggxp + 3 * n, pp, ggyp + n * L * F + l * F, gx2,
                            nullptr);
                }
            });
            // pass 2 (levels in parallel): params gradient
            if (need_params_grad && N > 0) {
                PlainAcc<S> acc{gparams.data_ptr<S>()};
                for_levels_points<S>(m, N, [&](int l, int64_t n) {
                    S tmp_ggy[8], tmp_gx[3] = {S(0), S(0), S(0)};
                    hashgrid::encode_level_backward_backward<0, S, P, PlainAcc<S>>(
                        m, l, xp + 3 * n, gyp + n * L * F + l * F, ggxp + 3 * n, pp, tmp_ggy, tmp_gx, &acc);
                });
            }
        }
    });
    if (need_params_grad) gparams = finish_params_grad(gparams, params);
    return {ggy, gparams, gx};
}

// ------------------------------------------------------------------ marching
// One marching pass (the CUDA launcher needs two: count, then fill): each block of rays appends its
// samples to its own buffer; `write(total, chunk_offsets, chunks)` then lays the buffers out in ray order.
template <typename S>
struct MarchChunk {
    std::vector<int64_t> rays;
    std::vector<S> starts, ends;
    void operator()(int64_t, S t0, S t1) {
        starts.push_back(t0);
        ends.push_back(t1);
    }
};

template <typename S, typename Write>
void march_chunks(const MarchInputs& in, const march::MarchParams& p, Write&& write) {
    const march::OccupancyView grid = in.view();
    const int64_t R = in.origins.size(0);
    const int64_t n_chunks = (R + kRayGrain - 1) / kRayGrain;
    const S* o = in.origins.data_ptr<S>();
    const S* d = in.directions.data_ptr<S>();
    const S* bx = in.box.data_ptr<S>();
    std::vector<MarchChunk<S>> chunks(n_chunks);
    at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
            MarchChunk<S>& out = chunks[c];
            for (int64_t r = c * kRayGrain; r < std::min(R, (c + 1) * kRayGrain); ++r) {
                const int64_t n = march::march_ray(o + 3 * r, d + 3 * r, bx, grid, p, out);
                out.rays.insert(out.rays.end(), n, r);
            }
        }
    });
    std::vector<int64_t> offsets(n_chunks + 1, 0);
    for (int64_t c = 0; c < n_chunks; ++c) offsets[c + 1] = offsets[c] + static_cast<int64_t>(chunks[c].rays.size());
    write(offsets[n_chunks], offsets, chunks);
}

// Copies the chunks' samples that fall below `capacity` into the packed outputs.
template <typename S>
void copy_chunks(const std::vector<MarchChunk<S>>& chunks, const std::vector<int64_t>& offsets, int64_t capacity,
                 int64_t* ri, S* ts, S* te) {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
            const MarchChunk<S>& in_chunk = chunks[c];
            const int64_t n = march::slots_within(offsets[c], static_cast<int64_t>(in_chunk.rays.size()), capacity);
            std::copy(in_chunk.rays.begin(), in_chunk.rays.begin() + n, ri + offsets[c]);
            std::copy(in_chunk.starts.begin(), in_chunk.starts.begin() + n, ts + offsets[c]);
            std::copy(in_chunk.ends.begin(), in_chunk.ends.begin() + n, te + offsets[c]);
        }
    });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> march_rays_cpu(const at::Tensor& origins_, const at::Tensor& directions_,
                                                              const at::Tensor& aabb_, const at::Tensor& binary_,
                                                              double near, double far, double step_size,
                                                              double cone_angle, double max_step_size) {
    check_same_device("march_rays", {origins_, directions_, aabb_, binary_});
    const MarchInputs in = prepare_march(origins_, directions_, aabb_, binary_);
    const march::MarchParams p{near, far, step_size, cone_angle, max_step_size};
    at::Tensor ray_indices, t_starts, t_ends;
    AT_DISPATCH_FLOATING_TYPES(in.origins.scalar_type(), "march_rays_cpu", [&] {
        using S = scalar_t;
        march_chunks<S>(in, p, [&](int64_t total, const std::vector<int64_t>& offsets, const std::vector<MarchChunk<S>>& chunks) {
            ray_indices = at::empty({total}, in.origins.options().dtype(at::kLong));
            t_starts = at::empty({total}, in.origins.options());
            t_ends = at::empty({total}, in.origins.options());
            copy_chunks<S>(chunks, offsets, total, ray_indices.data_ptr<int64_t>(), t_starts.data_ptr<S>(),
                           t_ends.data_ptr<S>());
        });
    });
    return {ray_indices, t_starts, t_ends};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> march_rays_fixed_cpu(
    const at::Tensor& origins_, const at::Tensor& directions_, const at::Tensor& aabb_, const at::Tensor& binary_,
    double near, double far, double step_size, double cone_angle, double max_step_size, int64_t capacity) {
    check_same_device("march_rays_fixed", {origins_, directions_, aabb_, binary_});
    TORCH_CHECK(capacity >= 0, "march_rays_fixed: capacity must be >= 0");
    const MarchInputs in = prepare_march(origins_, directions_, aabb_, binary_);
    const march::MarchParams p{near, far, step_size, cone_angle, max_step_size};
    const int64_t pad_ray = std::max<int64_t>(in.origins.size(0) - 1, 0);
    auto ray_indices = at::empty({capacity}, in.origins.options().dtype(at::kLong));
    auto t_starts = at::empty({capacity}, in.origins.options());
    auto t_ends = at::empty({capacity}, in.origins.options());
    auto n_samples = at::empty({}, in.origins.options().dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(in.origins.scalar_type(), "march_rays_fixed_cpu", [&] {
        using S = scalar_t;
        march_chunks<S>(in, p, [&](int64_t total, const std::vector<int64_t>& offsets, const std::vector<MarchChunk<S>>& chunks) {
            int64_t* ri = ray_indices.data_ptr<int64_t>();
            S *ts = t_starts.data_ptr<S>(), *te = t_ends.data_ptr<S>();
            copy_chunks<S>(chunks, offsets, capacity, ri, ts, te);
            for (int64_t i = std::min(total, capacity); i < capacity; ++i) march::write_padding(i, pad_ray, ri, ts, te);
            n_samples.fill_(total);
        });
    });
    return {ray_indices, t_starts, t_ends, n_samples};
}

std::tuple<at::Tensor, at::Tensor> occupancy_update_cpu(const at::Tensor& occupancy, const at::Tensor& indices_,
                                                        const at::Tensor& estimates_, double decay, double threshold) {
    check_same_device("occupancy_update", {occupancy, indices_, estimates_});
    at::Tensor out = occupancy_decayed(occupancy, indices_, estimates_, decay);
    auto indices = indices_.contiguous();
    auto estimates = estimates_.contiguous();
    const int64_t m = indices.numel();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "occupancy_update_cpu", [&] {
        using S = scalar_t;
        S* o = out.data_ptr<S>();
        const int64_t* idx = indices.data_ptr<int64_t>();
        const S* est = estimates.data_ptr<S>();
        // Sequential: cells may be drawn twice, and the scatter is cheap next to the estimates' field queries.
        for (int64_t k = 0; k < m; ++k) {
            if (march::estimate_raises_cell(o[idx[k]], est[k])) o[idx[k]] = est[k];
        }
    });
    return occupancy_threshold(out, threshold);
}

}  // namespace
}  // namespace fastdream

TORCH_LIBRARY_IMPL(fastdream, CPU, m) {
    using namespace fastdream;
    m.impl("hash_encode_fwd", &hash_encode_fwd_cpu);
    m.impl("hash_encode_bwd", &hash_encode_bwd_cpu);
    m.impl("hash_encode_bwd_bwd", &hash_encode_bwd_bwd_cpu);
    m.impl("march_rays", &march_rays_cpu);
    m.impl("march_rays_fixed", &march_rays_fixed_cpu);
    m.impl("occupancy_update", &occupancy_update_cpu);
    m.impl("compact_visible_samples", &fastdream::compact_visible_samples);
    m.impl("render_weights_fwd", &fastdream::render_weights_fwd);
    m.impl("render_weights_bwd", &fastdream::render_weights_bwd);
    m.impl("composite_fwd", &fastdream::composite_fwd);
    m.impl("composite_bwd", &fastdream::composite_bwd);
    m.impl("orbit_cameras", &fastdream::orbit_cameras);
    m.impl("camera_rays", &fastdream::camera_rays);
    m.impl("frequency_encode", &fastdream::frequency_encode);
    m.impl("rasterize_fwd", &fastdream::rasterize_fwd);
    m.impl("rasterize_bwd", &fastdream::rasterize_bwd);
    m.impl("interpolate_fwd", &fastdream::interpolate_fwd);
    m.impl("interpolate_bwd", &fastdream::interpolate_bwd);
    m.impl("antialias_fwd", &fastdream::antialias_fwd);
    m.impl("antialias_bwd", &fastdream::antialias_bwd);
}
