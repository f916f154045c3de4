// CUDA launchers of occupancy-grid marching (count pass, exclusive scan, fill pass; one thread per
// ray) and of the occupancy-grid update (one thread per visited cell).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastdream/cuda_glue.cuh"
#include "fastdream/torch_glue.h"
#include "../kernels/marching_impl.h"

#include <tuple>
#include <utility>

namespace fastdream {
namespace {

template <typename S>
__global__ void march_count_kernel(int64_t R, const S* __restrict__ o, const S* __restrict__ d,
                                   const S* __restrict__ box, const march::OccupancyView grid,
                                   const march::MarchParams p, int64_t* __restrict__ counts) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= R) return;
    S b[9];
#pragma unroll
    for (int i = 0; i < 9; ++i) b[i] = box[i];
    march::CountOnly emit;
    counts[r] = march::march_ray(o + 3 * r, d + 3 * r, b, grid, p, emit);
}

template <typename S>
__global__ void march_fill_kernel(int64_t R, const S* __restrict__ o, const S* __restrict__ d,
                                  const S* __restrict__ box, const march::OccupancyView grid,
                                  const march::MarchParams p, const int64_t* __restrict__ counts,
                                  const int64_t* __restrict__ ends, int64_t* ray_indices, S* t_starts, S* t_ends) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= R || counts[r] == 0) return;
    S b[9];
#pragma unroll
    for (int i = 0; i < 9; ++i) b[i] = box[i];
    march::WritePacked<S> emit{r, ends[r] - counts[r], counts[r], ray_indices, t_starts, t_ends};
    march::march_ray(o + 3 * r, d + 3 * r, b, grid, p, emit);
}

// Fixed-capacity fill: a ray writes the slots of its samples below `capacity` (march::slots_within).
template <typename S>
__global__ void march_fill_fixed_kernel(int64_t R, const S* __restrict__ o, const S* __restrict__ d,
                                        const S* __restrict__ box, const march::OccupancyView grid,
                                        const march::MarchParams p, const int64_t* __restrict__ counts,
                                        const int64_t* __restrict__ ends, int64_t capacity, int64_t* ray_indices,
                                        S* t_starts, S* t_ends) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (r >= R) return;
    const int64_t base = ends[r] - counts[r];
    const int64_t slots = march::slots_within(base, counts[r], capacity);
    if (slots == 0) return;
    S b[9];
#pragma unroll
    for (int i = 0; i < 9; ++i) b[i] = box[i];
    march::WritePacked<S> emit{r, base, slots, ray_indices, t_starts, t_ends};
    march::march_ray(o + 3 * r, d + 3 * r, b, grid, p, emit);
}

// The slots past the total (read on the device: no host sync) get padding.
template <typename S>
__global__ void march_pad_kernel(int64_t capacity, const int64_t* __restrict__ total, int64_t pad_ray,
                                 int64_t* ray_indices, S* t_starts, S* t_ends) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= capacity || i < *total) return;
    march::write_padding(i, pad_ray, ray_indices, t_starts, t_ends);
}

at::Device checked_device(const char* op, const at::Tensor& origins, const at::Tensor& directions,
                          const at::Tensor& aabb, const at::Tensor& binary) {
    check_same_device(op, {origins, directions, aabb, binary});
    return origins.device();
}

// What both marching launchers share: the checked inputs on their device (the guard lives as long as this
// object), the grid view, the stepping rule, and the count pass with its scan.
struct CudaMarch {
    c10::cuda::CUDAGuard guard;
    const MarchInputs in;
    const march::OccupancyView grid;
    const int64_t R;
    const march::MarchParams p;

    CudaMarch(const char* op, const at::Tensor& origins, const at::Tensor& directions, const at::Tensor& aabb,
              const at::Tensor& binary, double near, double far, double step_size, double cone_angle,
              double max_step_size)
        : guard(checked_device(op, origins, directions, aabb, binary)),
          in(prepare_march(origins, directions, aabb, binary)),
          grid(in.view()),
          R(in.origins.size(0)),
          p{near, far, step_size, cone_angle, max_step_size} {}

    template <typename S> const S* o() const { return in.origins.data_ptr<S>(); }
    template <typename S> const S* d() const { return in.directions.data_ptr<S>(); }
    template <typename S> const S* box() const { return in.box.data_ptr<S>(); }

    // Per-ray sample counts (counts[R] = 0) and their inclusive scan: ends[r] is where ray r's samples end,
    // ends[R] the total, still on the device.
    template <typename S>
    std::pair<at::Tensor, at::Tensor> count() const {
        auto counts = at::zeros({R + 1}, in.origins.options().dtype(at::kLong));
        if (R > 0) {
            march_count_kernel<S><<<cuda::blocks_for(R), cuda::kThreads, 0, cuda::stream()>>>(
                R, o<S>(), d<S>(), box<S>(), grid, p, counts.data_ptr<int64_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        return {counts, at::cumsum(counts, 0)};
    }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> march_rays_fixed_cuda(
    const at::Tensor& origins_, const at::Tensor& directions_, const at::Tensor& aabb_, const at::Tensor& binary_,
    double near, double far, double step_size, double cone_angle, double max_step_size, int64_t capacity) {
    const CudaMarch m("march_rays_fixed", origins_, directions_, aabb_, binary_, near, far, step_size, cone_angle,
                      max_step_size);
    TORCH_CHECK(capacity >= 0, "march_rays_fixed: capacity must be >= 0");
    const int64_t R = m.R;
    auto ray_indices = at::empty({capacity}, m.in.origins.options().dtype(at::kLong));
    auto t_starts = at::empty({capacity}, m.in.origins.options());
    auto t_ends = at::empty({capacity}, m.in.origins.options());
    at::Tensor ends;
    AT_DISPATCH_FLOATING_TYPES(m.in.origins.scalar_type(), "march_rays_fixed_cuda", [&] {
        using S = scalar_t;
        at::Tensor counts;
        std::tie(counts, ends) = m.count<S>();  // the total sizes nothing: it stays on the device
        if (R > 0 && capacity > 0) {
            march_fill_fixed_kernel<S><<<cuda::blocks_for(R), cuda::kThreads, 0, cuda::stream()>>>(
                R, m.o<S>(), m.d<S>(), m.box<S>(), m.grid, m.p, counts.data_ptr<int64_t>(), ends.data_ptr<int64_t>(),
                capacity, ray_indices.data_ptr<int64_t>(), t_starts.data_ptr<S>(), t_ends.data_ptr<S>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (capacity > 0) {
            march_pad_kernel<S><<<cuda::blocks_for(capacity), cuda::kThreads, 0, cuda::stream()>>>(
                capacity, ends.data_ptr<int64_t>() + R, R > 0 ? R - 1 : 0, ray_indices.data_ptr<int64_t>(),
                t_starts.data_ptr<S>(), t_ends.data_ptr<S>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
    });
    return {ray_indices, t_starts, t_ends, ends.select(0, R).clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> march_rays_cuda(const at::Tensor& origins_, const at::Tensor& directions_,
                                                               const at::Tensor& aabb_, const at::Tensor& binary_,
                                                               double near, double far, double step_size,
                                                               double cone_angle, double max_step_size) {
    const CudaMarch m("march_rays", origins_, directions_, aabb_, binary_, near, far, step_size, cone_angle,
                      max_step_size);
    const int64_t R = m.R;
    at::Tensor ray_indices, t_starts, t_ends;
    AT_DISPATCH_FLOATING_TYPES(m.in.origins.scalar_type(), "march_rays_cuda", [&] {
        using S = scalar_t;
        at::Tensor counts, ends;
        std::tie(counts, ends) = m.count<S>();
        const int64_t total = ends[R].item<int64_t>();  // one sync, to size the outputs
        ray_indices = at::empty({total}, counts.options());
        t_starts = at::empty({total}, m.in.origins.options());
        t_ends = at::empty({total}, m.in.origins.options());
        if (total > 0) {
            march_fill_kernel<S><<<cuda::blocks_for(R), cuda::kThreads, 0, cuda::stream()>>>(
                R, m.o<S>(), m.d<S>(), m.box<S>(), m.grid, m.p, counts.data_ptr<int64_t>(), ends.data_ptr<int64_t>(),
                ray_indices.data_ptr<int64_t>(), t_starts.data_ptr<S>(), t_ends.data_ptr<S>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
    });
    return {ray_indices, t_starts, t_ends};
}

// The occupancy update's max by compare-and-swap (no native float atomicMax; cells may be drawn more
// than once), with the shared rule of march::estimate_raises_cell.
__device__ __forceinline__ void atomic_max(float* address, float value) {
    int* bits = reinterpret_cast<int*>(address);
    int old = *bits, assumed;
    do {
        assumed = old;
        if (!march::estimate_raises_cell(__int_as_float(assumed), value)) return;
        old = atomicCAS(bits, assumed, __float_as_int(value));
    } while (assumed != old);
}

__device__ __forceinline__ void atomic_max(double* address, double value) {
    auto* bits = reinterpret_cast<unsigned long long*>(address);
    unsigned long long old = *bits, assumed;
    do {
        assumed = old;
        if (!march::estimate_raises_cell(__longlong_as_double(static_cast<long long>(assumed)), value)) return;
        old = atomicCAS(bits, assumed, static_cast<unsigned long long>(__double_as_longlong(value)));
    } while (assumed != old);
}

template <typename S>
__global__ void occupancy_scatter_max_kernel(int64_t m, int64_t n, const int64_t* __restrict__ indices,
                                             const S* __restrict__ estimates, S* __restrict__ out) {
    const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k >= m) return;
    const int64_t i = indices[k];
    const S e = estimates[k];
    if (i >= 0 && i < n) atomic_max(out + i, e);  // the launcher asserts the range; this keeps memory safe
}

std::tuple<at::Tensor, at::Tensor> occupancy_update_cuda(const at::Tensor& occupancy, const at::Tensor& indices_,
                                                         const at::Tensor& estimates_, double decay, double threshold) {
    check_same_device("occupancy_update", {occupancy, indices_, estimates_});
    c10::cuda::CUDAGuard guard(occupancy.device());
    at::Tensor out = occupancy_decayed(occupancy, indices_, estimates_, decay);
    auto indices = indices_.contiguous();
    auto estimates = estimates_.contiguous();
    const int64_t n = out.numel(), m = indices.numel();
    if (m > 0) {
        AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "occupancy_update_cuda", [&] {
            using S = scalar_t;
            occupancy_scatter_max_kernel<S><<<cuda::blocks_for(m, 256), 256, 0, cuda::stream()>>>(
                m, n, indices.data_ptr<int64_t>(), estimates.data_ptr<S>(), out.data_ptr<S>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    }
    return occupancy_threshold(out, threshold);
}

}  // namespace
}  // namespace fastdream

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("march_rays", &fastdream::march_rays_cuda);
    m.impl("march_rays_fixed", &fastdream::march_rays_fixed_cuda);
    m.impl("occupancy_update", &fastdream::occupancy_update_cuda);
}
