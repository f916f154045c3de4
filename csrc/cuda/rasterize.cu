// CUDA registration of the rasterization launchers, written once for both extensions in
// csrc/launchers/rasterize.h (one thread per triangle for the z-buffer, one per pixel otherwise).
#include <torch/library.h>

#include "../launchers/rasterize.h"

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("rasterize_fwd", &fastdream::rasterize_fwd);
    m.impl("rasterize_bwd", &fastdream::rasterize_bwd);
    m.impl("interpolate_fwd", &fastdream::interpolate_fwd);
    m.impl("interpolate_bwd", &fastdream::interpolate_bwd);
    m.impl("antialias_fwd", &fastdream::antialias_fwd);
    m.impl("antialias_bwd", &fastdream::antialias_bwd);
}
