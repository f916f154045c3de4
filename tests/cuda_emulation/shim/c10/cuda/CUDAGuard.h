#pragma once
#include <c10/core/Device.h>
#include <optional>
namespace c10 { namespace cuda {
// cudaemu: no device switching; counts live guards so a launch without one is reported.
struct CUDAGuard {
    explicit CUDAGuard(c10::Device) { ++::cudaemu::guards_alive; }
    explicit CUDAGuard(c10::DeviceIndex) { ++::cudaemu::guards_alive; }
    ~CUDAGuard() { --::cudaemu::guards_alive; }
    CUDAGuard(const CUDAGuard&) = delete;
};
struct OptionalCUDAGuard {
    explicit OptionalCUDAGuard(std::optional<c10::Device>) { ++::cudaemu::guards_alive; }
    ~OptionalCUDAGuard() { --::cudaemu::guards_alive; }
};
}}  // namespace c10::cuda
