// The interface between the CPU op (fused_adadelta_cpu.cpp, built once) and
// its kernel (adadelta_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../adadelta_math.h"

namespace adadelta_ext::cpu {

// One param's four tensors, each a flat array of numel elements.
struct FlatTensorPointers {
  void* param;
  void* grad;
  void* square_avg;
  void* acc_delta;
};

struct CpuStepArguments {
  AdadeltaHyperparams<double> hyper;
  // When set, grads are divided by grad_scale and stored back unscaled.
  bool unscale_grad;
  double grad_scale;
};

// Updates elements [begin, end) of one param.
using UpdateRangeFn = void (*)(
    const FlatTensorPointers& tensors,
    int64_t begin,
    int64_t end,
    const CpuStepArguments& arguments);

// Each instruction-set build defines update_range_for in the namespace its
// CPU_CAPABILITY macro names, as ATen does for its own kernels.
#define ADADELTA_DECLARE_CPU_KERNEL(capability)                      \
  namespace capability {                                             \
  UpdateRangeFn update_range_for(                                    \
      c10::ScalarType param_dtype, c10::ScalarType state_dtype);     \
  }

ADADELTA_DECLARE_CPU_KERNEL(DEFAULT)
#if defined(ADADELTA_CPU_ISA_DISPATCH)
ADADELTA_DECLARE_CPU_KERNEL(AVX2)
ADADELTA_DECLARE_CPU_KERNEL(AVX512)
#endif

#undef ADADELTA_DECLARE_CPU_KERNEL

} // namespace adadelta_ext::cpu
