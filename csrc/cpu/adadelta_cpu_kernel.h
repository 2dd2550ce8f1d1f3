// The interface between the CPU op (fused_adadelta_cpu.cpp, built once) and
// its kernel (adadelta_cpu_kernel.cpp, built once per instruction set).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../adadelta_math.h"

namespace adadelta_ext::cpu {

// One param's tensors, each a flat array of numel elements.
struct FlatTensorPointers {
  void* param;
  void* grad;
  void* square_avg;
  void* acc_delta;
  void* compensation;  // ParamRounding::kKahan: of the param's dtype
  uint64_t stochastic_round_key;  // ParamRounding::kStochastic: stochastic_round_key()
};

struct CpuStepArguments {
  AdadeltaHyperparams<double> hyper;
  // When set, grads are unscaled as GradScaler.unscale_ unscales them:
  // multiplied by inverse_grad_scale = float(1 / double(scale)), rounded to
  // their dtype and stored back; the step reads what was stored.
  bool unscale_grad;
  float inverse_grad_scale;
};

// Updates elements [begin, end) of one param.
using UpdateRangeFn = void (*)(
    const FlatTensorPointers& tensors,
    int64_t begin,
    int64_t end,
    const CpuStepArguments& arguments);

// The dtypes of one param's tensors and its rounding, which pick the kernel instance.
struct KernelDtypes {
  c10::ScalarType param;
  c10::ScalarType grad;
  c10::ScalarType state;
  ParamRounding rounding;
};

// The instance for `dtypes` in the kernel built for the instruction set this
// process runs with (see kernel_isa), or nullptr if none was built for them.
UpdateRangeFn find_update_range(const KernelDtypes& dtypes);

// The instruction set the CPU kernel runs with: the one torch's own kernels
// run with (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY) if a
// kernel was built for it, else "DEFAULT".
std::string kernel_isa();

// The instruction sets a kernel was built for, in setup.py's (ascending) order,
// up to the one this process runs with: those it can run, since ATen trusts
// ATEN_CPU_CAPABILITY and a build past the CPU's would die of an illegal
// instruction.
std::vector<std::string> kernel_isas();

// setup.py compiles adadelta_cpu_kernel.cpp once per entry of its
// CPU_KERNEL_FLAGS, with -DCPU_CAPABILITY=<name> and that entry's position as
// -DADADELTA_CPU_ISA_RANK; each build registers its lookup under its name when
// the library loads. (So the list of instruction sets lives in setup.py alone.)
using FindUpdateRangeFn = UpdateRangeFn (*)(const KernelDtypes& dtypes);
bool register_kernel_isa(const char* isa, int rank, FindUpdateRangeFn find);

} // namespace adadelta_ext::cpu
