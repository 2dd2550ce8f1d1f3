// A CUDA runtime for the host compiler, just enough to run the kernel of
// csrc/cuda/adadelta_cuda_kernel.cuh on the CPU (see tests/cuda_emulation.py).
//
// A block's threads never synchronize or share memory in that kernel, so
// running each (block, thread) to completion, one after another, is one of the
// schedules a GPU may run; emulated_launch runs them in the order the test
// picks. The rounding intrinsics are the host's IEEE operations, each rounded
// once to nearest even (the harness is compiled with -ffp-contract=off).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)

struct EmulatedIndex {
  unsigned int x = 0, y = 0, z = 0;
};
inline EmulatedIndex blockIdx;
inline EmulatedIndex threadIdx;

using cudaStream_t = struct EmulatedStream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };

// The toolkit the launch is built with: CUDA 13.0 unless the build says
// otherwise (tests/cuda_emulation.py builds a CUDA 12.0 one too).
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000
#endif

inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// One thread at a time: a plain add is atomic.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}

// What the harness sets before a call and reads after it.
struct EmulatedLaunches {
  int order = 0;  // 0: (block, thread) ascending; 1: descending; 2: shuffled
  unsigned int seed = 0;
  int driver_version = 13000;  // as cudaDriverGetVersion reports it
  int compute_capability_major = 9;  // of device 0, the only one
  cudaError_t last_error = cudaSuccess;
  std::vector<unsigned int> blocks;  // per launch since the harness cleared it
  std::vector<size_t> argument_bytes;  // likewise
};
inline EmulatedLaunches emulated_launches;

// The driver's limit on a launch's arguments: 32,764 bytes for a CUDA 12.1+
// build on a CUDA 12.1+ driver and a Volta+ GPU, else 4,096 (nvcc before 12.1
// compiles no larger kernel; a driver before it, or an older GPU, launches none).
inline size_t emulated_max_argument_bytes() {
  const bool large = CUDART_VERSION >= 12010 && emulated_launches.driver_version >= 12010 &&
      emulated_launches.compute_capability_major >= 7;
  return large ? 32764 : 4096;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = emulated_launches.last_error;
  emulated_launches.last_error = cudaSuccess;
  return error;
}

inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = emulated_launches.driver_version;
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (attribute != cudaDevAttrComputeCapabilityMajor || device != 0) {
    return cudaErrorInvalidValue;
  }
  *value = emulated_launches.compute_capability_major;
  return cudaSuccess;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), rewritten by
// tests/cuda_emulation.py as emulated_launch(kernel, grid, block, shared_bytes, stream, args...).
template <typename Kernel, typename... Args>
void emulated_launch(
    Kernel kernel,
    unsigned int grid,
    unsigned int block,
    size_t shared_bytes,
    cudaStream_t /*stream*/,
    const Args&... args) {
  const size_t argument_bytes = (sizeof(Args) + ... + 0);
  if (grid == 0 || block == 0 || block > 1024 || shared_bytes != 0 ||
      argument_bytes > emulated_max_argument_bytes()) {
    emulated_launches.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  emulated_launches.blocks.push_back(grid);
  emulated_launches.argument_bytes.push_back(argument_bytes);
  std::vector<uint64_t> order(static_cast<size_t>(grid) * block);
  std::iota(order.begin(), order.end(), uint64_t{0});
  if (emulated_launches.order == 1) {
    std::reverse(order.begin(), order.end());
  } else if (emulated_launches.order == 2) {
    std::mt19937_64 generator(emulated_launches.seed);
    std::shuffle(order.begin(), order.end(), generator);
  }
  for (const uint64_t index : order) {
    blockIdx.x = static_cast<unsigned int>(index / block);
    threadIdx.x = static_cast<unsigned int>(index % block);
    kernel(args...);
  }
}
