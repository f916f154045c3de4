// CUDA registration of the frequency encoding (frequency_encode), written once for both extensions in
// csrc/launchers/frequency_encoding.h (one thread per point through fastdream/parallel_for.h).
#include <torch/library.h>

#include "../launchers/frequency_encoding.h"

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("frequency_encode", &fastdream::frequency_encode);
}
