#pragma once
// __half, __half2 and their atomics are defined by emulated_cuda.h (force-included before this).
