// Operator schemas (torch.ops.fastdream.*) and the Python module fastdream._C.
// Device kernels are registered in cpu/ops_cpu.cpp and cuda/*.cu via TORCH_LIBRARY_IMPL; the fake
// (meta) implementations that torch.compile and opcheck need live in fastdream/ops/_native.py.
#include <torch/extension.h>

#include <string>
#include <vector>

#ifdef FD_WITH_CUDA
#include <cuda.h>
#endif

#ifndef FD_CUDA_ARCHS
#define FD_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastdream, m) {
    m.def("hash_encode_fwd(Tensor x, Tensor params, float[] scales, int[] resolutions, int[] offsets, int[] hashed, "
          "int n_features) -> Tensor");
    m.def("hash_encode_bwd(Tensor grad_y, Tensor x, Tensor params, float[] scales, int[] resolutions, int[] offsets, "
          "int[] hashed, int n_features, bool need_params_grad, bool need_x_grad) -> (Tensor, Tensor)");
    m.def("hash_encode_bwd_bwd(Tensor ggx, Tensor grad_y, Tensor x, Tensor params, float[] scales, int[] resolutions, "
          "int[] offsets, int[] hashed, int n_features, bool need_params_grad, bool need_x_grad) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("march_rays(Tensor origins, Tensor directions, Tensor aabb, Tensor binary, float near, float far, "
          "float step_size, float cone_angle, float max_step_size) -> (Tensor, Tensor, Tensor)");
    m.def("march_rays_fixed(Tensor origins, Tensor directions, Tensor aabb, Tensor binary, float near, float far, "
          "float step_size, float cone_angle, float max_step_size, int capacity) -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("compact_visible_samples(Tensor ray_indices, Tensor t_starts, Tensor t_ends, Tensor sigmas, "
          "Tensor? n_samples, int n_rays, float early_stop_eps, float alpha_threshold, int capacity) "
          "-> (Tensor, Tensor, Tensor, Tensor)");
    m.def("occupancy_update(Tensor occupancy, Tensor indices, Tensor estimates, float decay, float threshold) "
          "-> (Tensor, Tensor)");
    m.def("render_weights_fwd(Tensor t_starts, Tensor t_ends, Tensor sigmas, Tensor ray_offsets) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("render_weights_bwd(Tensor? grad_weights, Tensor? grad_trans, Tensor? grad_alphas, Tensor t_starts, "
          "Tensor t_ends, Tensor sigmas, Tensor ray_offsets, Tensor trans, Tensor alphas) -> Tensor");
    m.def("composite_fwd(Tensor t_starts, Tensor t_ends, Tensor ray_offsets, Tensor sigmas, Tensor albedo, "
          "Tensor? normals, Tensor origins, Tensor directions, Tensor light_positions, Tensor light_intensity, "
          "Tensor ambient, int mode) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("composite_bwd(Tensor g_rgb, Tensor g_opacity, Tensor g_depth, Tensor g_normal, Tensor? g_weights, "
          "Tensor t_starts, Tensor t_ends, Tensor ray_offsets, Tensor sigmas, Tensor albedo, Tensor? normals, "
          "Tensor origins, Tensor directions, Tensor light_positions, Tensor light_intensity, Tensor ambient, "
          "Tensor rgb, Tensor opacity, Tensor depth, Tensor normal, Tensor weights, int mode, bool need_normals_grad) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("orbit_cameras(Tensor camera_u, Tensor light_u, Tensor light_noise, Tensor lows, Tensor spans, int width, "
          "int height, float light_perturb, bool wrap_azimuth) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("camera_rays(Tensor c2w, Tensor fx, Tensor fy, Tensor cx, Tensor cy, Tensor light_position, "
          "Tensor light_intensity, Tensor ambient, int height, int width) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def("frequency_encode(Tensor x, int n_frequencies) -> Tensor");
    m.def("rasterize_fwd(Tensor pos, Tensor tri, int height, int width) -> (Tensor, Tensor, Tensor)");
    m.def("rasterize_bwd(Tensor g_bary, Tensor g_depth, Tensor pos, Tensor tri, Tensor tri_id) -> Tensor");
    m.def("interpolate_fwd(Tensor attr, Tensor tri_id, Tensor bary, Tensor tri) -> Tensor");
    m.def("interpolate_bwd(Tensor g_out, Tensor attr, Tensor tri_id, Tensor bary, Tensor tri) -> (Tensor, Tensor)");
    m.def("antialias_fwd(Tensor color, Tensor tri_id, Tensor depth, Tensor pos, Tensor tri, Tensor adjacency) -> Tensor");
    m.def("antialias_bwd(Tensor g_out, Tensor color, Tensor tri_id, Tensor depth, Tensor pos, Tensor tri, "
          "Tensor adjacency) "
          "-> (Tensor, Tensor)");
}

namespace {

std::vector<std::string> compiled_devices() {
#ifdef FD_WITH_CUDA
    return {"cpu", "cuda"};
#else
    return {"cpu"};
#endif
}

std::vector<std::string> cuda_archs() {
    std::vector<std::string> out;
    std::string s = FD_CUDA_ARCHS, cur;
    for (char ch : s) {
        if (ch == ';' || ch == ' ' || ch == ',') {
            if (!cur.empty()) out.push_back(cur);
            cur.clear();
        } else {
            cur += ch;
        }
    }
    if (!cur.empty()) out.push_back(cur);
    return out;
}

std::string cuda_version() {
#ifdef FD_WITH_CUDA
    return std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#else
    return "";
#endif
}

bool has_openmp() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fastdream native kernels; importing this module registers torch.ops.fastdream.*";
    m.def("compiled_devices", &compiled_devices, "Devices the kernels were built for: ('cpu',) or ('cpu', 'cuda')");
    m.def("cuda_archs", &cuda_archs, "CUDA architectures compiled in (TORCH_CUDA_ARCH_LIST at build time)");
    m.def("cuda_version", &cuda_version, "CUDA toolkit version the extension was built with ('' for CPU-only)");
    m.def("has_openmp", &has_openmp, "Whether the CPU kernels were built with OpenMP");
}
