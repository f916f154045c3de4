// Launcher of the pruning pass on packed samples (compact_visible_samples), written once for both
// extensions (see fastdream/parallel_for.h): a count pass (one work item per ray: its kept samples), an
// exclusive scan of the counts, a write pass (each ray copies its kept samples to its offset, below the
// capacity) and a padding pass over the output slots past the kept total. The valid-sample count and the
// kept total are read on the device, so a fixed capacity needs no host sync. Included by
// csrc/cpu/ops_cpu.cpp and csrc/cuda/pruning.cu, which register it for CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include "fastdream/parallel_for.h"
#include "fastdream/torch_glue.h"
#include "../kernels/pruning_impl.h"

namespace fastdream {
namespace {

constexpr int64_t kPruneRayGrain = 64;     // rays per CPU task
constexpr int64_t kPadSlotGrain = 4096;    // padding slots per CPU task

// A ray's samples in [0, n_valid): the ray indices are sorted, so two binary searches find them.
FD_HOST_DEVICE FD_INLINE void ray_span(const int64_t* ray_indices, int64_t n, const int64_t* n_valid, int64_t r,
                                       int64_t* begin, int64_t* end) {
    const int64_t valid = n_valid == nullptr ? n : fd_max<int64_t>(fd_min(*n_valid, n), 0);
    *begin = prune::lower_bound(ray_indices, 0, valid, r);
    *end = prune::lower_bound(ray_indices, *begin, valid, r + 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_visible_samples(
    const at::Tensor& ray_indices_, const at::Tensor& t_starts_, const at::Tensor& t_ends_, const at::Tensor& sigmas_,
    const c10::optional<at::Tensor>& n_samples_, int64_t n_rays, double early_stop_eps, double alpha_threshold,
    int64_t capacity) {
    check_same_device("compact_visible_samples",
                      {ray_indices_, t_starts_, t_ends_, sigmas_, or_undefined(n_samples_)});
    const int64_t N = ray_indices_.numel();
    TORCH_CHECK(ray_indices_.dim() == 1 && ray_indices_.scalar_type() == at::kLong,
                "compact_visible_samples: ray_indices must be a 1-D int64 tensor");
    TORCH_CHECK(t_starts_.dim() == 1 && t_starts_.numel() == N && t_ends_.sizes() == t_starts_.sizes() &&
                    sigmas_.sizes() == t_starts_.sizes(),
                "compact_visible_samples: t_starts, t_ends and sigmas must be 1-D like ray_indices");
    TORCH_CHECK(t_ends_.scalar_type() == t_starts_.scalar_type() && sigmas_.is_floating_point(),
                "compact_visible_samples: t_starts and t_ends must share a floating dtype, sigmas must be floating");
    const bool has_count = n_samples_.has_value() && n_samples_->defined();
    if (has_count)
        TORCH_CHECK(n_samples_->numel() == 1 && n_samples_->scalar_type() == at::kLong,
                    "compact_visible_samples: n_samples must be a one-element int64 tensor");
    TORCH_CHECK(n_rays >= 0 && capacity >= 0, "compact_visible_samples: n_rays and capacity must be >= 0");
    DeviceGuard guard(t_starts_.device());
    auto ray_indices = ray_indices_.contiguous();
    auto t_starts = t_starts_.contiguous(), t_ends = t_ends_.contiguous();
    auto sigmas = sigmas_.to(t_starts.scalar_type()).contiguous();
    at::Tensor n_valid = has_count ? n_samples_->reshape({}).contiguous() : at::Tensor();
    const int64_t R = n_rays, pad_ray = R > 0 ? R - 1 : 0;
    auto counts = at::zeros({R + 1}, ray_indices.options());  // counts[R] = 0: ends[R] is the kept total
    auto out_rays = at::empty({capacity}, ray_indices.options());
    auto out_starts = at::empty({capacity}, t_starts.options()), out_ends = at::empty({capacity}, t_starts.options());
    at::Tensor ends;
    AT_DISPATCH_FLOATING_TYPES(t_starts.scalar_type(), "compact_visible_samples", [&] {
        using S = scalar_t;
        const S eps = static_cast<S>(early_stop_eps), threshold = static_cast<S>(alpha_threshold);
        const int64_t* ri = ray_indices.data_ptr<int64_t>();
        const int64_t* valid = has_count ? n_valid.data_ptr<int64_t>() : nullptr;
        const S *ts = t_starts.data_ptr<S>(), *te = t_ends.data_ptr<S>(), *sig = sigmas.data_ptr<S>();
        int64_t* cnt = counts.data_ptr<int64_t>();
        parallel_for(R, kPruneRayGrain, [=] FD_LAMBDA(int64_t r) {
            int64_t b, e;
            ray_span(ri, N, valid, r, &b, &e);
            cnt[r] = prune::walk_ray(b, e, ts, te, sig, eps, threshold, prune::CountOnly{});
        });
        ends = at::cumsum(counts, 0);  // the kept total stays on the device: it sizes nothing
        if (capacity == 0) return;
        const int64_t* off = ends.data_ptr<int64_t>();
        int64_t* o_ri = out_rays.data_ptr<int64_t>();
        S *o_ts = out_starts.data_ptr<S>(), *o_te = out_ends.data_ptr<S>();
        parallel_for(R, kPruneRayGrain, [=] FD_LAMBDA(int64_t r) {
            const int64_t base = off[r] - cnt[r];
            if (cnt[r] == 0 || base >= capacity) return;
            int64_t b, e;
            ray_span(ri, N, valid, r, &b, &e);
            prune::WriteKept<S> write{base, capacity, ri, ts, te, o_ri, o_ts, o_te};
            prune::walk_ray(b, e, ts, te, sig, eps, threshold, write);
        });
        const int64_t* total = off + R;
        parallel_for(capacity, kPadSlotGrain, [=] FD_LAMBDA(int64_t i) {
            if (i >= *total) march::write_padding(i, pad_ray, o_ri, o_ts, o_te);
        });
    });
    return {out_rays, out_starts, out_ends, ends.select(0, R).clone()};
}

}  // namespace
}  // namespace fastdream
