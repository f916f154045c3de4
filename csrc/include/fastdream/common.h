// Shared helpers for fastdream's per-element kernels. Everything here is header-only, depends on no
// torch header, and compiles both as plain C++ (CPU extension, ctest executable) and under nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__
#define FD_INLINE __forceinline__
#else
#define FD_HOST_DEVICE
#define FD_INLINE inline
#endif

#if defined(__CUDACC__)
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_UNROLL
#endif

namespace fastdream {

// Exact (non-contracted) float arithmetic. The reference ops are chains of separate PyTorch ops, each
// rounding its result; the native kernels must produce the same floats wherever a value feeds a
// discrete decision (grid cell, step count), so they must not let the compiler fuse a*b+c into an FMA.
// nvcc contracts by default: use the _rn intrinsics there. Host code is built with -ffp-contract=off.
FD_HOST_DEVICE FD_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
FD_HOST_DEVICE FD_INLINE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}
FD_HOST_DEVICE FD_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
FD_HOST_DEVICE FD_INLINE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}
FD_HOST_DEVICE FD_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
FD_HOST_DEVICE FD_INLINE double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}
FD_HOST_DEVICE FD_INLINE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
FD_HOST_DEVICE FD_INLINE double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __ddiv_rn(a, b);
#else
    return a / b;
#endif
}

template <typename T>
FD_HOST_DEVICE FD_INLINE T fd_min(T a, T b) { return a < b ? a : b; }
template <typename T>
FD_HOST_DEVICE FD_INLINE T fd_max(T a, T b) { return a > b ? a : b; }

// NaN-propagating min/max like torch.minimum / torch.maximum.
template <typename T>
FD_HOST_DEVICE FD_INLINE T nan_min(T a, T b) { return (a != a || a < b) ? a : b; }
template <typename T>
FD_HOST_DEVICE FD_INLINE T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }

FD_HOST_DEVICE FD_INLINE float fd_floor(float v) { return floorf(v); }
FD_HOST_DEVICE FD_INLINE double fd_floor(double v) { return floor(v); }
FD_HOST_DEVICE FD_INLINE float fd_exp(float v) { return expf(v); }
FD_HOST_DEVICE FD_INLINE double fd_exp(double v) { return exp(v); }
FD_HOST_DEVICE FD_INLINE float fd_sqrt(float v) { return sqrtf(v); }
FD_HOST_DEVICE FD_INLINE double fd_sqrt(double v) { return sqrt(v); }
FD_HOST_DEVICE FD_INLINE float fd_abs(float v) { return fabsf(v); }
FD_HOST_DEVICE FD_INLINE double fd_abs(double v) { return fabs(v); }
FD_HOST_DEVICE FD_INLINE float fd_copysign(float a, float b) { return copysignf(a, b); }
FD_HOST_DEVICE FD_INLINE double fd_copysign(double a, double b) { return copysign(a, b); }
FD_HOST_DEVICE FD_INLINE float fd_sin(float v) { return sinf(v); }
FD_HOST_DEVICE FD_INLINE double fd_sin(double v) { return sin(v); }
FD_HOST_DEVICE FD_INLINE float fd_cos(float v) { return cosf(v); }
FD_HOST_DEVICE FD_INLINE double fd_cos(double v) { return cos(v); }
FD_HOST_DEVICE FD_INLINE float fd_fmod(float a, float b) { return fmodf(a, b); }
FD_HOST_DEVICE FD_INLINE double fd_fmod(double a, double b) { return fmod(a, b); }

}  // namespace fastdream
