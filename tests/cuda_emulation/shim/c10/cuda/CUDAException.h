#pragma once
#include <c10/util/Exception.h>
// cudaemu: a launch records its error (bad config, wrong stream, misaligned atomic...) and the check throws it.
#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                       \
    do {                                                                                     \
        const std::string cudaemu_err_ = ::cudaemu::take_error();                             \
        TORCH_CHECK(cudaemu_err_.empty(), "cudaemu (emulated CUDA launch): ", cudaemu_err_);    \
    } while (0)
