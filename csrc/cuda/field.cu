// CUDA registration of the per-point field ops (sample points, probe points, the field's output head),
// written once for both extensions in csrc/launchers/field.h (one thread per point through
// fastdream/parallel_for.h).
#include <torch/library.h>

#include "../launchers/field.h"

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("ray_points", &fastdream::ray_points);
    m.impl("probe_points", &fastdream::probe_points);
    m.impl("field_head_fwd", &fastdream::field_head_fwd);
    m.impl("field_head_bwd", &fastdream::field_head_bwd);
}
