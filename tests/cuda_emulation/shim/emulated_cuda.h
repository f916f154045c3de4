// Emulated CUDA: compiles fastdream's csrc/cuda/*.cu (kernels *and* torch launchers) as host C++ so
// they run on CPU tensors. Force-included (-include emulated_cuda.h) before each translated .cu.
//  - CUDA keywords become nothing; blockIdx/threadIdx/blockDim/gridDim are thread-local variables.
//  - translate.py rewrites K<<<grid, block, smem, stream>>>(args), in the .cu files and in the csrc headers
//    (mirrored, translated, by build.py), into
//    ::cudaemu::launch_at("K", "file", __LINE__, K, grid, block, smem, stream)(args): every block (spread over
//    ATen's thread pool, in shuffled order) and every thread of each block runs. This is valid only
//    for kernels without __syncthreads, __shared__ or warp intrinsics, which fastdream's kernels avoid.
//  - Atomics are real host atomics (compare-and-swap loops for float, double, half and half2).
//  - A launch checks what CUDA checks when it runs (grid and block limits, a zero-sized grid, 4 KiB of
//    kernel parameters, half2 alignment) and the project's rules (launch on
//    c10::cuda::getCurrentCUDAStream(), a CUDAGuard alive); C10_CUDA_KERNEL_LAUNCH_CHECK raises it.
//  - TORCH_LIBRARY_IMPL(fastdream, CUDA, m) registers each launcher as the op
//    <CUDAEMU_NAMESPACE>::<name> (schema inferred from its C++ signature), callable with CPU tensors.
//  - At its end this header defines __CUDACC__ (not __CUDA_ARCH__), after the torch headers: the project's
//    sources then take the branches nvcc's host pass takes (fastdream/parallel_for.h: the kernel launch,
//    __host__ __device__ lambdas, the CUDA device guard), not silently their CPU branches.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#ifndef CUDAEMU_NAMESPACE
#define CUDAEMU_NAMESPACE fastdream_cudaemu
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cudaemu {

// The "current stream" handed out by the c10::cuda shim: a sentinel, so a launch on stream 0 is caught.
inline cudaStream_t current_stream_sentinel() { return reinterpret_cast<cudaStream_t>(uintptr_t(0x5157)); }
inline thread_local int guards_alive = 0;

struct State {
    std::mutex mu;
    std::string error;                        // first launch/kernel error since the last check
    std::map<std::string, long> launches;     // "file:line kernel" -> count (one entry per launch site)
    std::map<std::string, long long> threads;  // "file:line kernel" -> emulated threads
};
inline State& state() { static State s; return s; }
inline void fail(const std::string& msg) {
    std::lock_guard<std::mutex> lock(state().mu);
    if (state().error.empty()) state().error = msg;
}
inline std::string take_error() {
    std::lock_guard<std::mutex> lock(state().mu);
    std::string e;
    std::swap(e, state().error);
    return e;
}
inline std::string stats() {
    std::lock_guard<std::mutex> lock(state().mu);
    std::ostringstream os;
    for (auto& kv : state().launches) os << kv.first << "\tlaunches=" << kv.second << "\tthreads=" << state().threads[kv.first] << "\n";
    return os.str();
}
inline void reset_stats() {
    std::lock_guard<std::mutex> lock(state().mu);
    state().launches.clear();
    state().threads.clear();
}
inline unsigned order_seed() {
    static unsigned s = [] { const char* v = std::getenv("FASTDREAM_CUDAEMU_SEED"); return v ? unsigned(std::atoi(v)) : 12345u; }();
    return s;
}

template <class... P>
struct Launch {
    void (*k)(P...);
    dim3 g, b;
    size_t smem;
    cudaStream_t stream;
    const char* name;
    const char* file;
    int line;
    void operator()(P... args) const {
        std::ostringstream site;
        site << file << ":" << line << " " << name;
        const std::string where = site.str();
        auto bad = [&](const std::string& why) { fail(where + ": " + why); };
        if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) return bad("invalid configuration argument (a zero grid/block dimension)");
        if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) return bad("grid dimension over the limit (x < 2^31, y,z <= 65535)");
        if (uint64_t(b.x) * b.y * b.z > 1024u || b.z > 64u) return bad("block over 1024 threads");
        if (smem > 48 * 1024) return bad("dynamic shared memory over 48 KiB without opt-in");
        constexpr size_t param_bytes = (size_t(0) + ... + sizeof(P));
        if (param_bytes > 4096) return bad("kernel parameters over 4 KiB");
        if (stream != current_stream_sentinel()) bad("launched on a stream other than c10::cuda::getCurrentCUDAStream()");
        if (guards_alive <= 0) bad("launched without a CUDAGuard / OptionalCUDAGuard alive");
        const int64_t nblocks = int64_t(g.x) * g.y * g.z;
        const int64_t nthreads = int64_t(b.x) * b.y * b.z;
        {
            std::lock_guard<std::mutex> lock(state().mu);
            state().launches[where] += 1;
            state().threads[where] += nblocks * nthreads;
        }
        // Shuffled block order (exposes a dependence on block scheduling), threads in reverse order.
        std::vector<int64_t> order(nblocks);
        std::iota(order.begin(), order.end(), int64_t(0));
        std::shuffle(order.begin(), order.end(), std::mt19937(order_seed() + unsigned(nblocks)));
        const dim3 gg = g, bb = b;
        at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; ++i) {
                const int64_t lin = order[i];
                gridDim = gg;
                blockDim = bb;
                blockIdx = {unsigned(lin % gg.x), unsigned((lin / gg.x) % gg.y), unsigned(lin / (int64_t(gg.x) * gg.y))};
                for (int64_t t = nthreads - 1; t >= 0; --t) {
                    threadIdx = {unsigned(t % bb.x), unsigned((t / bb.x) % bb.y), unsigned(t / (int64_t(bb.x) * bb.y))};
                    k(args...);
                }
            }
        });
    }
};

template <class... P>
Launch<P...> launch_at(const char* name, const char* file, int line, void (*k)(P...), dim3 g, dim3 b,
                       size_t smem = 0, cudaStream_t s = nullptr) {
    return Launch<P...>{k, g, b, smem, s, name, file, line};
}

template <class T, class U>
inline T fd_bit_cast(U u) {
    static_assert(sizeof(T) == sizeof(U), "size");
    T t;
    std::memcpy(&t, &u, sizeof t);
    return t;
}

template <class Bits, class V, class Op>
inline V cas_update(V* addr, Op op) {
    Bits* p = reinterpret_cast<Bits*>(addr);
    Bits old = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        Bits want = fd_bit_cast<Bits>(op(fd_bit_cast<V>(old)));
        if (__atomic_compare_exchange_n(p, &old, want, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return fd_bit_cast<V>(old);
    }
}

}  // namespace cudaemu

// ---------------------------------------------------------------- device intrinsics used by the .cu files
inline float __int_as_float(int v) { return cudaemu::fd_bit_cast<float>(v); }
inline int __float_as_int(float v) { return cudaemu::fd_bit_cast<int>(v); }
inline double __longlong_as_double(long long v) { return cudaemu::fd_bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return cudaemu::fd_bit_cast<long long>(v); }

inline int atomicCAS(int* a, int compare, int val) {
    __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long compare, unsigned long long val) {
    __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
inline float atomicAdd(float* a, float v) { return cudaemu::cas_update<uint32_t>(a, [v](float o) { return o + v; }); }
inline double atomicAdd(double* a, double v) { return cudaemu::cas_update<uint64_t>(a, [v](double o) { return o + v; }); }

// cuda_fp16 subset: __half is c10::Half (same 16-bit layout); __half2 a 4-byte-aligned pair.
using __half = c10::Half;
struct alignas(4) __half2 { __half x, y; };
inline __half __float2half_rn(float f) { return __half(f); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half atomicAdd(__half* a, __half v) {
    if (reinterpret_cast<uintptr_t>(a) % 2) cudaemu::fail("misaligned __half atomicAdd");
    return cudaemu::cas_update<uint16_t>(a, [v](__half o) { return __half(float(o) + float(v)); });
}
inline __half2 atomicAdd(__half2* a, __half2 v) {
    if (reinterpret_cast<uintptr_t>(a) % 4) {  // the GPU raises cudaErrorMisalignedAddress
        cudaemu::fail("misaligned __half2 atomicAdd (address not 4-byte aligned)");
        return v;
    }
    return cudaemu::cas_update<uint32_t>(a, [v](__half2 o) {
        return __half2{__half(float(o.x) + float(v.x)), __half(float(o.y) + float(v.y))};
    });
}

// ---------------------------------------------------------------- registration redirect
namespace cudaemu {
struct EmuLib {
    torch::Library* lib;
    template <class F>
    EmuLib& impl(const char* name, F&& f) {
        lib->def(name, std::forward<F>(f));
        return *this;
    }
};
struct EmuRegistrar {
    std::unique_ptr<torch::Library> lib;
    EmuRegistrar(void (*init)(EmuLib&), const char* file, uint32_t line) {
        lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, C10_STRINGIZE(CUDAEMU_NAMESPACE), std::nullopt, file, line);
        EmuLib e{lib.get()};
        init(e);
    }
};
}  // namespace cudaemu

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m)                                                                           \
    static void C10_CONCATENATE(cudaemu_init_, __LINE__)(::cudaemu::EmuLib&);                                   \
    static const ::cudaemu::EmuRegistrar C10_CONCATENATE(cudaemu_reg_, __LINE__)(                               \
        &C10_CONCATENATE(cudaemu_init_, __LINE__), __FILE__, __LINE__);                                        \
    void C10_CONCATENATE(cudaemu_init_, __LINE__)(::cudaemu::EmuLib & m)

// From here on, the translated sources are compiled as nvcc's host pass compiles them. Every torch header
// they use is included above (the c10/cuda ones are the shims), so none sees this define.
#define __CUDACC__ 1
