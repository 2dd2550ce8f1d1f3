// The CUDA implementation of adadelta_ext::fused_adadelta_: given checked
// arguments (fused_adadelta.h), the multi-tensor kernel
// (adadelta_cuda_launch.cu) once per (param, grad, state) dtype group, on the
// current stream. Nothing here waits
// for the device or copies to the host, so a CUDA graph can capture a step:
// lr, grad_scale and found_inf are read by the kernel, which also increments
// the steps (under stochastic rounding, a launch of its own after the update).
//
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
// names. ATen/cuda/CUDAContext.h is not included: it pulls in cuBLAS and
// cuSPARSE headers, which this file does not use and which a toolkit with the
// runtime headers only (as on CI, which compiles this file) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../fused_adadelta.h"
#include "adadelta_cuda_launch.h"

namespace adadelta_ext::cuda {
namespace {

// The kernel reads c10::Half and c10::BFloat16 data as __half and __nv_bfloat16.
static_assert(sizeof(at::Half) == sizeof(__half) && alignof(at::Half) == alignof(__half));
static_assert(
    sizeof(at::BFloat16) == sizeof(__nv_bfloat16) &&
    alignof(at::BFloat16) == alignof(__nv_bfloat16));

// The tensors of one call with the same (param, grad, state) dtypes: one kernel instance.
struct DtypeGroup {
  at::ScalarType param_dtype;
  at::ScalarType grad_dtype;
  at::ScalarType state_dtype;
  std::vector<AdadeltaTensorPointers> tensors;
};

// The kernel reads float32 and float64 scalars; the narrower floating dtypes
// convert to float32 exactly, on the device.
at::Tensor kernel_readable(const std::optional<at::Tensor>& scalar) {
  if (!scalar.has_value()) {
    return at::Tensor();
  }
  const at::ScalarType dtype = scalar->scalar_type();
  return dtype == at::kFloat || dtype == at::kDouble ? *scalar : scalar->to(at::kFloat);
}

DeviceScalar device_scalar(const at::Tensor& scalar) {
  if (!scalar.defined()) {
    return DeviceScalar{nullptr, false};
  }
  return DeviceScalar{scalar.const_data_ptr(), scalar.scalar_type() == at::kDouble};
}

// lr, grad_scale and found_inf as the kernel reads them.
struct KernelScalars {
  at::Tensor lr;
  at::Tensor grad_scale;
  at::Tensor found_inf;
};

template <typename param_t, typename grad_t, typename state_t>
void launch_group_as(
    const DtypeGroup& group,
    ParamRounding rounding,
    const FusedAdadeltaOptions& options,
    const KernelScalars& scalars,
    cudaStream_t stream) {
  // lr from a tensor is read (and rounded) by the kernel.
  const AdadeltaStepScalars<double> step_scalars{
      adadelta_hyperparams(options, options.lr),
      device_scalar(scalars.lr),
      device_scalar(scalars.grad_scale),
      device_scalar(scalars.found_inf)};
  const auto launch = [&](auto rounding_constant) {
    C10_CUDA_CHECK((launch_multi_tensor_adadelta<param_t, grad_t, state_t, decltype(rounding_constant)::value>(
        group.tensors.data(), group.tensors.size(), step_scalars, stream)));
  };
  using Rounding = ParamRounding;
  if constexpr (std::is_same_v<param_t, __half> || std::is_same_v<param_t, __nv_bfloat16>) {
    if (rounding == Rounding::kKahan) {
      return launch(std::integral_constant<Rounding, Rounding::kKahan>{});
    }
    if (rounding == Rounding::kStochastic) {
      return launch(std::integral_constant<Rounding, Rounding::kStochastic>{});
    }
  }
  // The checks refuse either option for other params.
  TORCH_INTERNAL_ASSERT(rounding == Rounding::kNearest);
  launch(std::integral_constant<Rounding, Rounding::kNearest>{});
}

// The instance for the group's dtypes: the triples check_fused_adadelta_call
// accepts, and no other.
void launch_group(
    const DtypeGroup& group,
    ParamRounding rounding,
    const FusedAdadeltaOptions& options,
    const KernelScalars& scalars,
    cudaStream_t stream) {
  using at::ScalarType;
  // float32 grads or state of a 16-bit param.
  const bool float_grad = group.grad_dtype == at::kFloat;
  const bool float_state = group.state_dtype == at::kFloat;
  const auto instance = [&](auto param, auto grad, auto state) {
    using param_t = decltype(param);
    using grad_t = decltype(grad);
    using state_t = decltype(state);
    return launch_group_as<param_t, grad_t, state_t>(group, rounding, options, scalars, stream);
  };
  const auto sixteen_bit = [&](auto param) {
    using param_t = decltype(param);
    if (float_grad) {
      return float_state ? instance(param, 0.0f, 0.0f) : instance(param, 0.0f, param_t{});
    }
    return float_state ? instance(param, param_t{}, 0.0f) : instance(param, param_t{}, param_t{});
  };
  const bool same_dtypes = group.grad_dtype == group.param_dtype && group.state_dtype == group.param_dtype;
  switch (group.param_dtype) {
    case ScalarType::Float:
      if (same_dtypes) {
        return instance(0.0f, 0.0f, 0.0f);
      }
      break;
    case ScalarType::Double:
      if (group.state_dtype == at::kDouble) {
        return float_grad ? instance(0.0, 0.0f, 0.0) : instance(0.0, 0.0, 0.0);
      }
      break;
    case ScalarType::Half:
      return sixteen_bit(__half{});
    case ScalarType::BFloat16:
      return sixteen_bit(__nv_bfloat16{});
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(
      false, "fused_adadelta_: no CUDA kernel for params of dtype ", group.param_dtype,
      " with grads of dtype ", group.grad_dtype, " and state of dtype ", group.state_dtype);
}

void fused_adadelta_cuda_impl(const FusedAdadeltaTensors& tensors, const FusedAdadeltaOptions& options) {
  const c10::cuda::CUDAGuard device_guard(tensors.params[0].device());

  const bool unscale_grad = options.grad_scale.has_value();
  const FlatTensorLists flat(tensors, unscale_grad);
  const auto& seeds = tensors.stochastic_round_seeds;
  const ParamRounding rounding = tensors.rounding();
  std::vector<DtypeGroup> groups;
  for (size_t i = 0; i < flat.params.size(); ++i) {
    const at::ScalarType param_dtype = flat.params[i].scalar_type();
    const at::ScalarType grad_dtype = flat.grads[i].scalar_type();
    const at::ScalarType state_dtype = flat.square_avgs[i].scalar_type();
    auto group = std::find_if(groups.begin(), groups.end(), [&](const DtypeGroup& candidate) {
      return candidate.param_dtype == param_dtype && candidate.grad_dtype == grad_dtype &&
          candidate.state_dtype == state_dtype;
    });
    if (group == groups.end()) {
      group = groups.insert(groups.end(), DtypeGroup{param_dtype, grad_dtype, state_dtype, {}});
    }
    group->tensors.push_back(AdadeltaTensorPointers{
        flat.params[i].mutable_data_ptr(),
        flat.grads[i].mutable_data_ptr(),
        flat.square_avgs[i].mutable_data_ptr(),
        flat.acc_deltas[i].mutable_data_ptr(),
        tensors.state_steps[i].mutable_data_ptr(),
        tensors.state_steps[i].scalar_type() == at::kDouble,
        flat.params[i].numel(),
        flat.compensations.empty() ? nullptr : flat.compensations[i].mutable_data_ptr(),
        seeds.has_value() ? static_cast<uint64_t>((*seeds)[i]) : 0});
  }

  // Held until every launch is queued; a converted copy is freed after, in
  // stream order, so the kernels still read it.
  const KernelScalars scalars{
      kernel_readable(options.lr_tensor),
      kernel_readable(options.grad_scale),
      kernel_readable(options.found_inf)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const DtypeGroup& group : groups) {
    launch_group(group, rounding, options, scalars, stream);
  }
  if (rounding == ParamRounding::kStochastic) {
    // After every group's update, as the CPU op reads every count before it increments any.
    for (const DtypeGroup& group : groups) {
      C10_CUDA_CHECK(launch_increment_steps(
          group.tensors.data(), group.tensors.size(), device_scalar(scalars.found_inf), stream));
    }
  }
  flat.write_back();
}

} // namespace

TORCH_LIBRARY_IMPL(adadelta_ext, CUDA, m) {
  ADADELTA_IMPL_BOTH_OVERLOADS(m, &fused_adadelta_cuda_impl);
}

} // namespace adadelta_ext::cuda
