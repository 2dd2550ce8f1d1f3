// The interface between the CUDA op's ATen glue (fused_adadelta_cuda.cpp,
// built by the host compiler) and the kernel's launch (adadelta_cuda_launch.cu,
// built by nvcc). No torch header and no device code: each side compiles alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../adadelta_math.h"

namespace adadelta_ext::cuda {

// float16/bfloat16 params compute in float, float32 and float64 in themselves.
template <typename param_t>
using opmath_t = std::conditional_t<std::is_same_v<param_t, double>, double, float>;

// One param's four tensors, each a flat array of numel elements (numel may be
// zero), and its one-element step counter.
struct AdadeltaTensorPointers {
  void* param;
  void* grad;
  void* square_avg;
  void* acc_delta;
  void* step;
  bool step_is_double;  // float64 step, else float32
  int64_t numel;
  void* compensation;  // ParamRounding::kKahan: of the param's dtype
  uint64_t stochastic_round_seed;  // ParamRounding::kStochastic
};

// A one-element float32 or float64 tensor on the device, read in the kernel
// so that no step waits for the host. A null address means "not given".
struct DeviceScalar {
  const void* address;
  bool is_double;
};

// hyper in the kernel's opmath; the launch takes it in double and rounds it.
template <typename opmath>
struct AdadeltaStepScalars {
  AdadeltaHyperparams<opmath> hyper;
  DeviceScalar lr;  // when given, replaces hyper.lr
  DeviceScalar grad_scale;  // when given, grads are unscaled by it and stored back
  DeviceScalar found_inf;  // when given and nonzero, nothing changes
};

// Updates every tensor in place and adds one to each step counter, with as
// few kernel launches on `stream` as the kernel's argument size allows: up to
// 616 tensors a launch where the driver and the current device take 32 KB of
// kernel arguments, 75 elsewhere; with Kahan summation or stochastic rounding
// 535 and 65 (adadelta_cuda_kernel.cuh). Returns the
// first error of the runtime's device queries or of a launch, cudaSuccess
// otherwise.
// Instantiated for the (param, grad, state) types the op accepts: grads of the
// param's type or float; state of the param's type, or float for 16-bit params;
// 16-bit params with each ParamRounding, others with kNearest. With
// kStochastic no step counter is incremented: see launch_increment_steps.
template <typename param_t, typename grad_t, typename state_t, ParamRounding kRounding>
cudaError_t launch_multi_tensor_adadelta(
    const AdadeltaTensorPointers* tensors,
    size_t count,
    const AdadeltaStepScalars<double>& scalars,
    cudaStream_t stream);

// Adds one to each tensor's step counter, unless found_inf is given and
// nonzero: launched after every kStochastic launch of a step, whose kernels
// read the counts. Returns the first launch error, cudaSuccess otherwise.
cudaError_t launch_increment_steps(
    const AdadeltaTensorPointers* tensors,
    size_t count,
    DeviceScalar found_inf,
    cudaStream_t stream);

} // namespace adadelta_ext::cuda
