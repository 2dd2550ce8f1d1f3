// The interface between the CPU op (fused_adadelta_cpu.cpp, built once) and
// its kernel (adadelta_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

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

// The dtypes of one param's tensors, which pick the kernel instance.
struct KernelDtypes {
  c10::ScalarType param;
  c10::ScalarType grad;
  c10::ScalarType state;
};

// The instance for `dtypes` in the kernel built for the instruction set this
// process runs with (see kernel_isa), or nullptr if none was built for them.
UpdateRangeFn find_update_range(const KernelDtypes& dtypes);

// The instruction set the CPU kernel runs with: "AVX512", "AVX2" or "DEFAULT",
// chosen by at::get_cpu_capability(), so ATEN_CPU_CAPABILITY is honoured.
std::string kernel_isa();

// Each instruction-set build defines find_update_range in the namespace its
// CPU_CAPABILITY macro names, as ATen does for its own kernels.
#define ADADELTA_DECLARE_CPU_KERNEL(capability) \
  namespace capability {                        \
  UpdateRangeFn find_update_range(const KernelDtypes& dtypes); \
  }

ADADELTA_DECLARE_CPU_KERNEL(DEFAULT)
#if defined(ADADELTA_CPU_ISA_DISPATCH)
ADADELTA_DECLARE_CPU_KERNEL(AVX2)
ADADELTA_DECLARE_CPU_KERNEL(AVX512)
#endif

#undef ADADELTA_DECLARE_CPU_KERNEL

} // namespace adadelta_ext::cpu
