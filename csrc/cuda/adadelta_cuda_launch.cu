// The launch of the multi-tensor Adadelta kernel (adadelta_cuda_kernel.cuh):
// fills launch metadata from a list of tensors, in the larger of the two
// argument layouts the device takes, and launches the kernel each time it is
// full. No torch header: fused_adadelta_cuda.cpp calls in through
// adadelta_cuda_launch.h.
#include <algorithm>

#include "adadelta_cuda_kernel.cuh"
#include "adadelta_cuda_launch.h"

namespace adadelta_ext::cuda {
namespace {

// Whether the current device takes kernels of the 32 KB layout (NOTE [Two
// argument layouts] in adadelta_cuda_kernel.cuh): a driver of CUDA 12.1 or
// newer and a GPU of Volta or newer. Asked at every call, as cheap as reading
// a cached value, so no state is kept; none of these calls is a stream
// operation, so a step may be captured in a CUDA graph.
[[maybe_unused]] cudaError_t large_kernel_arguments_supported(bool* supported) {
  int driver_version = 0;
  int device = 0;
  int compute_capability_major = 0;
  cudaError_t error = cudaDriverGetVersion(&driver_version);
  if (error == cudaSuccess) {
    error = cudaGetDevice(&device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(
        &compute_capability_major, cudaDevAttrComputeCapabilityMajor, device);
  }
  *supported = driver_version >= 12010 && compute_capability_major >= 7;
  return error;
}

// Fills metadata of the layout of kArgumentBytes from the tensors and
// launches the kernel each time it is full.
template <typename param_t, typename grad_t, typename state_t, ParamRounding kRounding, int kArgumentBytes>
cudaError_t launch_in_layout(
    const AdadeltaTensorPointers* tensors,
    size_t count,
    const AdadeltaStepScalars<opmath_t<param_t>>& scalars,
    cudaStream_t stream) {
  using Metadata = MultiTensorLaunchMetadata<kArgumentBytes, kRounding>;
  Metadata metadata{};
  int64_t blocks = 0;
  // Launches the tensors metadata holds, then empties it.
  const auto launch = [&]() {
    multi_tensor_adadelta_kernel<param_t, grad_t, state_t, kArgumentBytes, kRounding>
        <<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
            metadata, scalars);
    metadata.tensor_count = 0;
    blocks = 0;
    return cudaGetLastError();
  };

  for (size_t i = 0; i < count; ++i) {
    const AdadeltaTensorPointers& tensor = tensors[i];
    // A zero-element tensor gets one block too, to increment its step.
    const int64_t chunks =
        std::max<int64_t>(1, (tensor.numel + kChunkElements - 1) / kChunkElements);
    if (chunks > kMaxBlocksPerLaunch) {
      return cudaErrorInvalidValue;  // over 2^31 chunks: more than one launch's grid
    }
    if (metadata.tensor_count == Metadata::kMaxTensors ||
        blocks + chunks > kMaxBlocksPerLaunch) {
      const cudaError_t error = launch();
      if (error != cudaSuccess) {
        return error;
      }
    }
    const int slot = metadata.tensor_count++;
    metadata.params[slot] = tensor.param;
    metadata.grads[slot] = tensor.grad;
    metadata.square_avgs[slot] = tensor.square_avg;
    metadata.acc_deltas[slot] = tensor.acc_delta;
    metadata.steps[slot] = tensor.step;
    metadata.step_is_double[slot] = tensor.step_is_double;
    metadata.numels[slot] = tensor.numel;
    if constexpr (kRounding == ParamRounding::kKahan) {
      metadata.compensations[slot] = tensor.compensation;
    }
    if constexpr (kRounding == ParamRounding::kStochastic) {
      metadata.stochastic_round_seeds[slot] = tensor.stochastic_round_seed;
    }
    blocks += chunks;
    metadata.block_ends[slot] = static_cast<int32_t>(blocks);
  }
  return metadata.tensor_count == 0 ? cudaSuccess : launch();
}

} // namespace

template <typename param_t, typename grad_t, typename state_t, ParamRounding kRounding>
cudaError_t launch_multi_tensor_adadelta(
    const AdadeltaTensorPointers* tensors,
    size_t count,
    const AdadeltaStepScalars<double>& scalars_in_double,
    cudaStream_t stream) {
  using opmath = opmath_t<param_t>;
  const AdadeltaStepScalars<opmath> scalars{
      hyperparams_as<opmath>(scalars_in_double.hyper),
      scalars_in_double.lr,
      scalars_in_double.grad_scale,
      scalars_in_double.found_inf};
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  bool large = false;
  const cudaError_t error = large_kernel_arguments_supported(&large);
  if (error != cudaSuccess) {
    return error;
  }
  if (large) {
    return launch_in_layout<param_t, grad_t, state_t, kRounding, kLargeArgumentBytes>(
        tensors, count, scalars, stream);
  }
#endif
  return launch_in_layout<param_t, grad_t, state_t, kRounding, kSmallArgumentBytes>(
      tensors, count, scalars, stream);
}

cudaError_t launch_increment_steps(
    const AdadeltaTensorPointers* tensors,
    size_t count,
    DeviceScalar found_inf,
    cudaStream_t stream) {
  StepCounters counters{};
  for (size_t first = 0; first < count; first += kMaxStepCounters) {
    counters.count = static_cast<int>(std::min<size_t>(kMaxStepCounters, count - first));
    for (int i = 0; i < counters.count; ++i) {
      counters.steps[i] = tensors[first + i].step;
      counters.step_is_double[i] = tensors[first + i].step_is_double;
    }
    increment_steps_kernel<<<1, kThreadsPerBlock, 0, stream>>>(counters, found_inf);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) {
      return error;
    }
  }
  return cudaSuccess;
}

#define ADADELTA_INSTANTIATE_LAUNCH(param_t, grad_t, state_t, rounding)                   \
  template cudaError_t launch_multi_tensor_adadelta<param_t, grad_t, state_t, rounding>( \
      const AdadeltaTensorPointers*,                                                      \
      size_t,                                                                             \
      const AdadeltaStepScalars<double>&,                                                 \
      cudaStream_t);
// The 16-bit params' instances, for each way of rounding the param.
#define ADADELTA_INSTANTIATE_16_BIT_LAUNCHES(rounding)                           \
  ADADELTA_INSTANTIATE_LAUNCH(__half, __half, __half, rounding)                  \
  ADADELTA_INSTANTIATE_LAUNCH(__half, __half, float, rounding)                   \
  ADADELTA_INSTANTIATE_LAUNCH(__half, float, __half, rounding)                   \
  ADADELTA_INSTANTIATE_LAUNCH(__half, float, float, rounding)                    \
  ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, rounding) \
  ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, __nv_bfloat16, float, rounding)     \
  ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, float, __nv_bfloat16, rounding)     \
  ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, float, float, rounding)

ADADELTA_INSTANTIATE_LAUNCH(float, float, float, ParamRounding::kNearest)
ADADELTA_INSTANTIATE_LAUNCH(double, double, double, ParamRounding::kNearest)
ADADELTA_INSTANTIATE_LAUNCH(double, float, double, ParamRounding::kNearest)
ADADELTA_INSTANTIATE_16_BIT_LAUNCHES(ParamRounding::kNearest)
ADADELTA_INSTANTIATE_16_BIT_LAUNCHES(ParamRounding::kKahan)
ADADELTA_INSTANTIATE_16_BIT_LAUNCHES(ParamRounding::kStochastic)

#undef ADADELTA_INSTANTIATE_16_BIT_LAUNCHES
#undef ADADELTA_INSTANTIATE_LAUNCH

} // namespace adadelta_ext::cuda
