// The launch of the multi-tensor Adadelta kernel (adadelta_cuda_kernel.cuh):
// fills launch metadata from a list of tensors and launches the kernel each
// time it is full. No torch header: fused_adadelta_cuda.cpp calls in through
// adadelta_cuda_launch.h.
#include <algorithm>

#include "adadelta_cuda_kernel.cuh"
#include "adadelta_cuda_launch.h"

namespace adadelta_ext::cuda {

template <typename param_t, typename grad_t, typename state_t>
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
  MultiTensorLaunchMetadata metadata{};
  int64_t blocks = 0;
  // Launches the tensors metadata holds, then empties it.
  const auto launch = [&]() {
    multi_tensor_adadelta_kernel<param_t, grad_t, state_t>
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
    if (metadata.tensor_count == kMaxTensorsPerLaunch ||
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
    blocks += chunks;
    metadata.block_ends[slot] = static_cast<int32_t>(blocks);
  }
  return metadata.tensor_count == 0 ? cudaSuccess : launch();
}

#define ADADELTA_INSTANTIATE_LAUNCH(param_t, grad_t, state_t)                   \
  template cudaError_t launch_multi_tensor_adadelta<param_t, grad_t, state_t>( \
      const AdadeltaTensorPointers*,                                            \
      size_t,                                                                   \
      const AdadeltaStepScalars<double>&,                                       \
      cudaStream_t);

ADADELTA_INSTANTIATE_LAUNCH(float, float, float)
ADADELTA_INSTANTIATE_LAUNCH(double, double, double)
ADADELTA_INSTANTIATE_LAUNCH(double, float, double)
ADADELTA_INSTANTIATE_LAUNCH(__half, __half, __half)
ADADELTA_INSTANTIATE_LAUNCH(__half, __half, float)
ADADELTA_INSTANTIATE_LAUNCH(__half, float, __half)
ADADELTA_INSTANTIATE_LAUNCH(__half, float, float)
ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, __nv_bfloat16, float)
ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, float, __nv_bfloat16)
ADADELTA_INSTANTIATE_LAUNCH(__nv_bfloat16, float, float)

#undef ADADELTA_INSTANTIATE_LAUNCH

} // namespace adadelta_ext::cuda
