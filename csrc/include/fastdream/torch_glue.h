// Host-side glue shared by the CPU and CUDA launchers: argument checks and grid metadata.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include <initializer_list>

#include "../../kernels/compositing_impl.h"
#include "../../kernels/hash_encoding_impl.h"
#include "../../kernels/marching_impl.h"

namespace fastdream {

#define FD_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

// Every tensor argument of an op on one device: the dispatcher picks the kernel from the highest-priority
// device among them, so a CPU tensor could otherwise reach a CUDA kernel (or the other way round).
inline void check_same_device(const char* op, std::initializer_list<at::Tensor> tensors) {
    const at::Tensor* first = nullptr;
    for (const at::Tensor& t : tensors) {
        if (!t.defined()) continue;
        if (first == nullptr) first = &t;
        TORCH_CHECK(t.device() == first->device(), op, ": all tensor arguments must be on one device, got ",
                    first->device(), " and ", t.device());
    }
}

inline at::Tensor or_undefined(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

inline hashgrid::GridMeta make_grid_meta(c10::ArrayRef<double> scales, c10::IntArrayRef resolutions,
                                         c10::IntArrayRef offsets, c10::IntArrayRef hashed, int64_t n_features) {
    const int64_t L = static_cast<int64_t>(scales.size());
    TORCH_CHECK(L >= 1 && L <= hashgrid::kMaxLevels, "hash_encode: n_levels must be in [1, ", hashgrid::kMaxLevels,
                "], got ", L);
    TORCH_CHECK(static_cast<int64_t>(resolutions.size()) == L && static_cast<int64_t>(hashed.size()) == L &&
                    static_cast<int64_t>(offsets.size()) == L + 1,
                "hash_encode: scales/resolutions/hashed need n_levels entries and offsets n_levels + 1");
    TORCH_CHECK(n_features == 1 || n_features == 2 || n_features == 4 || n_features == 8,
                "hash_encode: n_features must be 1, 2, 4 or 8");
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

// The three (x, params) dtype combinations the hash-grid kernels accept (checked by check_hash_inputs):
// S = compute/x dtype, P = params dtype (HalfT: at::Half on CPU, __half on CUDA).
#define FD_DISPATCH_HASH_TYPES(x, params, HalfT, ...)                      \
    [&] {                                                                 \
        if ((x).scalar_type() == at::kDouble) {                           \
            using S = double;                                             \
            using P = double;                                             \
            return __VA_ARGS__();                                         \
        } else if ((params).scalar_type() == at::kHalf) {                 \
            using S = float;                                              \
            using P = HalfT;                                              \
            return __VA_ARGS__();                                         \
        } else {                                                          \
            using S = float;                                              \
            using P = float;                                              \
            return __VA_ARGS__();                                         \
        }                                                                 \
    }()

// Parameter-gradient accumulation buffer dtype: the compute dtype (float for float/half params).
inline at::ScalarType grad_accum_dtype(const at::Tensor& x) { return x.scalar_type(); }

// ---------------------------------------------------------------- volume rendering argument prep
inline void check_packed(const at::Tensor& t_starts, const at::Tensor& t_ends, const at::Tensor& sigmas,
                  const at::Tensor& ray_offsets) {
    TORCH_CHECK(t_starts.dim() == 1 && t_ends.sizes() == t_starts.sizes() && sigmas.sizes() == t_starts.sizes(),
                "t_starts, t_ends and sigmas must be 1-D of the same length");
    TORCH_CHECK(ray_offsets.dim() == 1 && ray_offsets.numel() >= 1 && ray_offsets.scalar_type() == at::kLong,
                "ray_offsets must be a 1-D int64 tensor of n_rays + 1 offsets");
}

template <typename S>
inline const S* opt_ptr(const c10::optional<at::Tensor>& t, at::Tensor& keep, at::ScalarType dtype) {
    if (!t.has_value() || !t->defined()) return nullptr;
    keep = t->to(dtype).contiguous();
    return keep.data_ptr<S>();
}

struct CompositeArgs {
    at::Tensor t_starts, t_ends, off, sigmas, albedo, normals, origins, directions, lights, intensity, ambient;
};

inline CompositeArgs prepare_composite(const at::Tensor& t_starts, const at::Tensor& t_ends, const at::Tensor& ray_offsets,
                                const at::Tensor& sigmas, const at::Tensor& albedo,
                                const c10::optional<at::Tensor>& normals, const at::Tensor& origins,
                                const at::Tensor& directions, const at::Tensor& light_positions,
                                const at::Tensor& light_intensity, const at::Tensor& ambient, int64_t mode) {
    check_packed(t_starts, t_ends, sigmas, ray_offsets);
    TORCH_CHECK(mode >= 0 && mode <= 2, "composite: mode must be 0 (albedo), 1 (lambertian) or 2 (textureless)");
    const int64_t N = sigmas.numel(), R = ray_offsets.numel() - 1;
    TORCH_CHECK(albedo.dim() == 2 && albedo.size(0) == N && albedo.size(1) == 3, "composite: albedo must be (N, 3)");
    bool has_n = normals.has_value() && normals->defined();
    TORCH_CHECK(has_n || mode == 0, "composite: normals are required for lambertian/textureless shading");
    if (has_n) TORCH_CHECK(normals->sizes() == albedo.sizes(), "composite: normals must be (N, 3)");
    for (const at::Tensor* t : {&origins, &directions, &light_positions})
        TORCH_CHECK(t->dim() == 2 && t->size(0) == R && t->size(1) == 3, "composite: per-ray vectors must be (R, 3)");
    TORCH_CHECK(light_intensity.numel() == R && ambient.numel() == R, "composite: intensity/ambient must be (R,)");
    const auto dt = sigmas.scalar_type();
    CompositeArgs a;
    a.t_starts = t_starts.to(dt).contiguous();
    a.t_ends = t_ends.to(dt).contiguous();
    a.off = ray_offsets.contiguous();
    a.sigmas = sigmas.contiguous();
    a.albedo = albedo.to(dt).contiguous();
    if (has_n) a.normals = normals->to(dt).contiguous();
    a.origins = origins.to(dt).contiguous();
    a.directions = directions.to(dt).contiguous();
    a.lights = light_positions.to(dt).contiguous();
    a.intensity = light_intensity.to(dt).reshape({R}).contiguous();
    a.ambient = ambient.to(dt).reshape({R}).contiguous();
    return a;
}

// The composite backward's inputs (incoming gradients, saved forward outputs) in the samples' dtype and
// contiguous, and its outputs allocated: shared by the CPU and CUDA launchers.
struct CompositeBackwardTensors {
    at::Tensor g_rgb, g_op, g_depth, g_normal;
    at::Tensor grad_sigmas, grad_albedo, grad_normals;
    bool want_normals = false;
};

inline CompositeBackwardTensors prepare_composite_backward(
    const CompositeArgs& a, const at::Tensor& g_rgb, const at::Tensor& g_op, const at::Tensor& g_depth,
    const at::Tensor& g_normal, bool need_normals_grad) {
    const auto dt = a.sigmas.scalar_type();
    auto as_dt = [dt](const at::Tensor& t) { return t.to(dt).contiguous(); };
    CompositeBackwardTensors b;
    b.g_rgb = as_dt(g_rgb), b.g_op = as_dt(g_op), b.g_depth = as_dt(g_depth), b.g_normal = as_dt(g_normal);
    b.grad_sigmas = at::empty_like(a.sigmas);
    b.grad_albedo = at::empty_like(a.albedo);
    b.want_normals = need_normals_grad && a.normals.defined();
    b.grad_normals = b.want_normals ? at::empty_like(a.normals) : at::empty({0}, a.sigmas.options());
    return b;
}

// ---------------------------------------------------------------- marching argument prep
// Marching inputs checked and laid out once for both devices: rays contiguous in one dtype, the box
// (lo, hi, size) in that dtype, derived from the (6,) aabb with the reference's arithmetic (size = hi - lo in
// the aabb's dtype, then converted), the bitfield and its coarse summary of march::kBlock^3-cell blocks.
struct MarchInputs {
    at::Tensor origins, directions, box, cells, blocks;

    march::OccupancyView view() const {
        march::OccupancyView v{};
        v.cells = reinterpret_cast<const uint8_t*>(cells.data_ptr<bool>());
        v.blocks = blocks.data_ptr<uint8_t>();
        for (int a = 0; a < 3; ++a) {
            v.res[a] = cells.size(a);
            v.block_res[a] = blocks.size(a);
        }
        return v;
    }
};

inline MarchInputs prepare_march(const at::Tensor& origins, const at::Tensor& directions, const at::Tensor& aabb,
                                 const at::Tensor& binary) {
    TORCH_CHECK(origins.dim() == 2 && origins.size(1) == 3, "march_rays: origins must be (N, 3)");
    TORCH_CHECK(directions.sizes() == origins.sizes(), "march_rays: directions must match origins");
    TORCH_CHECK(binary.dim() == 3 && binary.scalar_type() == at::kBool, "march_rays: binary must be a 3-D bool grid");
    TORCH_CHECK(binary.size(0) > 0 && binary.size(1) > 0 && binary.size(2) > 0, "march_rays: the grid must not be empty");
    TORCH_CHECK(aabb.numel() == 6, "march_rays: aabb must hold (x_min, y_min, z_min, x_max, y_max, z_max)");
    MarchInputs m;
    m.origins = origins.contiguous();
    m.directions = directions.to(m.origins.scalar_type()).contiguous();
    const at::Tensor flat = aabb.reshape({6});
    const at::Tensor lo = flat.slice(0, 0, 3), hi = flat.slice(0, 3, 6);
    m.box = at::cat({lo, hi, hi - lo}).to(m.origins.device(), m.origins.scalar_type()).contiguous();
    m.cells = binary.to(m.origins.device()).contiguous();
    const int64_t k = march::kBlock;
    int64_t blocks[3], pad[6];
    for (int a = 0; a < 3; ++a) {
        blocks[a] = (m.cells.size(a) + k - 1) / k;
        pad[2 * (2 - a)] = 0;  // constant_pad_nd lists the last dimension first
        pad[2 * (2 - a) + 1] = blocks[a] * k - m.cells.size(a);
    }
    m.blocks = at::constant_pad_nd(m.cells.to(at::kByte), pad, 0)
                   .view({blocks[0], k, blocks[1], k, blocks[2], k})
                   .amax({1, 3, 5})
                   .contiguous();
    return m;
}

// ---------------------------------------------------------------- occupancy-grid update
// The launchers scatter the estimates into `decayed` (march::estimate_raises_cell); the index check, the decay and the
// mean-capped threshold are ATen ops on the device, so the update needs no host sync.
inline at::Tensor occupancy_decayed(const at::Tensor& occupancy, const at::Tensor& indices, const at::Tensor& estimates,
                                    double decay) {
    TORCH_CHECK(occupancy.dim() == 1 && at::isFloatingType(occupancy.scalar_type()),
                "occupancy_update: occupancy must be a flat float tensor");
    TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, "occupancy_update: indices must be 1-D int64");
    TORCH_CHECK(estimates.sizes() == indices.sizes() && estimates.scalar_type() == occupancy.scalar_type(),
                "occupancy_update: estimates must match indices, in the occupancy's dtype");
    TORCH_CHECK(indices.device() == occupancy.device() && estimates.device() == occupancy.device(),
                "occupancy_update: all tensors must be on one device");
    if (indices.numel() > 0) {
        // Raises on CPU; a device-side assert on CUDA (as torch's own scatter does), with no host sync.
        const auto [lo, hi] = at::aminmax(indices);
        at::_assert_async(at::logical_and(lo >= 0, hi < occupancy.numel()),
                          "occupancy_update: an index is out of range for the grid's cells");
    }
    return at::mul(occupancy.contiguous(), decay);
}

inline std::tuple<at::Tensor, at::Tensor> occupancy_threshold(const at::Tensor& updated, double threshold) {
    return {updated, at::gt(updated, at::clamp_max(updated.mean(), threshold))};
}

template <typename S>
inline render::ShadeInputs<S> shade_inputs(const CompositeArgs& a, int64_t r) {
    return {a.origins.data_ptr<S>() + 3 * r, a.directions.data_ptr<S>() + 3 * r, a.lights.data_ptr<S>() + 3 * r,
            a.intensity.data_ptr<S>()[r], a.ambient.data_ptr<S>()[r]};
}

}  // namespace fastdream
