// The CPU implementation of adadelta_ext::fused_adadelta_: given checked
// arguments (fused_adadelta.h), picks the kernel built for this CPU's
// instruction set and runs it across all elements of all tensors with
// at::parallel_for.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../fused_adadelta.h"
#include "adadelta_cpu_kernel.h"

namespace adadelta_ext::cpu {

namespace {

struct RegisteredIsa {
  std::string name;
  int rank;
  FindUpdateRangeFn find;
};

// Filled while the library loads, before any op runs.
std::vector<RegisteredIsa>& registered_isas() {
  static std::vector<RegisteredIsa> isas;
  return isas;
}

const RegisteredIsa* find_isa(const std::string& name) {
  for (const RegisteredIsa& isa : registered_isas()) {
    if (isa.name == name) {
      return &isa;
    }
  }
  return nullptr;
}

} // namespace

bool register_kernel_isa(const char* isa, int rank, FindUpdateRangeFn find) {
  registered_isas().push_back({isa, rank, find});
  return true;
}

std::vector<std::string> kernel_isas() {
  std::vector<RegisteredIsa> isas = registered_isas();
  std::sort(isas.begin(), isas.end(), [](const RegisteredIsa& a, const RegisteredIsa& b) {
    return a.rank < b.rank;
  });
  const int running = find_isa(kernel_isa())->rank;
  std::vector<std::string> names;
  for (const RegisteredIsa& isa : isas) {
    if (isa.rank <= running) {
      names.push_back(isa.name);
    }
  }
  return names;
}

std::string kernel_isa() {
  const std::string capability = at::get_cpu_capability();
  return find_isa(capability) != nullptr ? capability : "DEFAULT";
}

UpdateRangeFn find_update_range(const KernelDtypes& dtypes) {
  // The instruction set is picked once, as torch picks its own kernels.
  static const FindUpdateRangeFn find_in_isa_build = [] {
    const RegisteredIsa* isa = find_isa(kernel_isa());
    TORCH_INTERNAL_ASSERT(isa != nullptr, "fused_adadelta_: no CPU kernel was built for DEFAULT");
    return isa->find;
  }();
  return find_in_isa_build(dtypes);
}

namespace {

// Each param's step counter, read and incremented directly: item() and add_
// dispatch an op, microseconds per tensor.
double step_value(const FlatParam& param) {
  return param.step_dtype == at::kFloat ? *static_cast<const float*>(param.step)
                                        : *static_cast<const double*>(param.step);
}

void increment_steps(const std::vector<FlatParam>& flat) {
  for (const FlatParam& param : flat) {
    if (param.step_dtype == at::kFloat) {
      *static_cast<float*>(param.step) += 1;
    } else {
      *static_cast<double*>(param.step) += 1;
    }
  }
}

// The kernel over every element of every param, in ranges of at::parallel_for.
void run_kernel(
    const std::vector<FlatParam>& flat,
    const std::optional<at::IntArrayRef>& seeds,
    ParamRounding rounding,
    const CpuStepArguments& arguments) {
  const size_t count = flat.size();
  std::vector<FlatTensorPointers> pointers(count);
  std::vector<UpdateRangeFn> kernels(count);
  std::vector<int64_t> ends(count);  // ends[i]: one past param i's last element, counted over all params
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    const FlatParam& param = flat[i];
    pointers[i] = FlatTensorPointers{
        param.param, param.grad, param.square_avg, param.acc_delta, param.compensation,
        seeds.has_value() ? stochastic_round_key(
                                static_cast<uint64_t>((*seeds)[i]),
                                stochastic_round_step(step_value(param)))
                          : 0};
    const KernelDtypes dtypes{param.param_dtype, param.grad_dtype, param.state_dtype, rounding};
    // Params mostly come in runs of one dtype: look the kernel up once per run.
    const bool same_as_previous = i > 0 && dtypes.param == flat[i - 1].param_dtype &&
        dtypes.grad == flat[i - 1].grad_dtype && dtypes.state == flat[i - 1].state_dtype;
    kernels[i] = same_as_previous ? kernels[i - 1] : find_update_range(dtypes);
    TORCH_INTERNAL_ASSERT(
        kernels[i] != nullptr, "fused_adadelta_: no CPU kernel for params of dtype ",
        dtypes.param, " with grads of dtype ", dtypes.grad, " and state of dtype ", dtypes.state);
    total += param.numel;
    ends[i] = total;
  }

  // Before the kernel, which would evict the counters from the caches (NOTE [Versions
  // bumped first]), and after every rounding key read its counter (two params may share one).
  increment_steps(flat);
  at::parallel_for(0, total, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    // A range may span several params, and a param several ranges.
    size_t i = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
    for (; begin < end; ++i) {
      const int64_t param_begin = i == 0 ? 0 : ends[i - 1];
      const int64_t range_end = std::min(end, ends[i]);
      if (range_end > begin) {
        kernels[i](pointers[i], begin - param_begin, range_end - param_begin, arguments);
      }
      begin = range_end;
    }
  });
}

void fused_adadelta_cpu_impl(const FusedAdadeltaTensors& tensors, const FusedAdadeltaOptions& options) {
  if (options.found_inf.has_value() && options.found_inf->item<double>() != 0) {
    return;  // GradScaler found an inf or NaN: the step is skipped whole.
  }
  const bool unscale_grad = options.grad_scale.has_value();
  const CpuStepArguments arguments{
      adadelta_hyperparams(
          options, options.lr_tensor.has_value() ? options.lr_tensor->item<double>() : options.lr),
      unscale_grad,
      unscale_grad ? static_cast<float>(1.0 / options.grad_scale->item<double>()) : 1.0f};
  const auto& seeds = tensors.stochastic_round_seeds;
  if (tensors.flat_params != nullptr) {
    run_kernel(*tensors.flat_params, seeds, tensors.rounding(), arguments);
    return;
  }
  const FlatTensorLists flat(tensors, unscale_grad);
  run_kernel(flat.flat_params(tensors.state_steps), seeds, tensors.rounding(), arguments);
  flat.write_back();
}

} // namespace
} // namespace adadelta_ext::cpu

namespace adadelta_ext {
template <>
constexpr bool kRunsFromFlatParams<&cpu::fused_adadelta_cpu_impl> = true;
} // namespace adadelta_ext

namespace adadelta_ext::cpu {

TORCH_LIBRARY_IMPL(adadelta_ext, CPU, m) {
  ADADELTA_IMPL_BOTH_OVERLOADS(m, &fused_adadelta_cpu_impl);
}

} // namespace adadelta_ext::cpu
