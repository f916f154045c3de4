// CUDA registration of the volume-rendering launchers, written once for both extensions in
// csrc/launchers/volume_rendering.h (one thread per ray through fastdream/parallel_for.h).
#include <torch/library.h>

#include "../launchers/volume_rendering.h"

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("render_weights_fwd", &fastdream::render_weights_fwd);
    m.impl("render_weights_bwd", &fastdream::render_weights_bwd);
    m.impl("composite_fwd", &fastdream::composite_fwd);
    m.impl("composite_bwd", &fastdream::composite_bwd);
}
