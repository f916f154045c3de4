// CUDA registration of the pruning pass (compact_visible_samples), written once for both extensions in
// csrc/launchers/pruning.h (count, scan, write and padding through fastdream/parallel_for.h).
#include <torch/library.h>

#include "../launchers/pruning.h"

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("compact_visible_samples", &fastdream::compact_visible_samples);
}
