// adadelta_ext's entry point: the op definitions, and the kernels every
// backend shares (autograd's version counters, meta, sparse refusal). The
// device implementations live in cpu/ and cuda/; each checks its call through
// checked_call (fused_adadelta.h) before changing anything.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

#include "cpu/adadelta_cpu_kernel.h"
#include "fused_adadelta.h"

namespace adadelta_ext {
namespace {

// For the meta device (shapes only, as torch.compile traces) and the check op:
// the checks alone.
void check_only(const FusedAdadeltaTensors& /*tensors*/, const FusedAdadeltaOptions& /*options*/) {}

// Sparse grads select the op's sparse dispatch keys: refuse them there, after
// the checks every dense backend runs (and with their messages).
void refuse_sparse(const FusedAdadeltaTensors& /*tensors*/, const FusedAdadeltaOptions& /*options*/) {
  TORCH_CHECK(false, "fused_adadelta_: FusedAdadelta does not support sparse gradients");
}

// What ATen's generated ADInplaceOrView kernels do for an in-place op: run it,
// then bump the version counter of every tensor it wrote, so autograd refuses
// a backward through a tensor the step changed. Boxed, so one kernel serves
// both overloads; grads count as written only when grad_scale unscales them.
void bump_versions_of_written_tensors(
    const c10::OperatorHandle& op,
    c10::DispatchKeySet keys,
    torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const auto inputs = torch::jit::last(*stack, arguments.size());
  const auto grad_scale = op.schema().argumentIndexWithName("grad_scale");
  const bool grads_are_written = grad_scale.has_value() && !inputs[*grad_scale].isNone();
  std::vector<c10::List<at::Tensor>> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias != nullptr && alias->isWrite() &&
        (arguments[i].name() != "grads" || grads_are_written)) {
      written.push_back(inputs[i].toTensorList());
    }
  }
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& tensors : written) {
    for (const at::Tensor& tensor : tensors) {
      torch::autograd::impl::bump_version(tensor);
    }
  }
}

} // namespace

TORCH_LIBRARY(adadelta_ext, m) {
  // Modelled on aten::_fused_adam_: one call updates a whole list of tensors
  // in place. grads are mutable because, when grad_scale is given, the
  // kernel unscales them in place as GradScaler.unscale_ would.
  // Each state_steps[i] is incremented by one, unless found_inf is set.
  // round_lr_product (tensor lr only): param + update * (-lr) with two
  // roundings, as torch.optim.Adadelta(capturable=True) computes a tensor lr
  // step; otherwise one fused multiply-add, as it computes every other step.
  m.def(
      "fused_adadelta_(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] square_avgs, Tensor(d!)[] acc_deltas, "
      "Tensor(e!)[] state_steps, *, float lr, float rho, float eps, "
      "float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "fused_adadelta_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] square_avgs, Tensor(d!)[] acc_deltas, "
      "Tensor(e!)[] state_steps, *, Tensor lr, float rho, float eps, "
      "float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, bool round_lr_product=False) -> ()");
  // Raises what fused_adadelta_ would raise for the same arguments, and changes
  // nothing: an optimizer making several calls checks them all first.
  m.def(
      "check_fused_adadelta(Tensor[] params, Tensor[] grads, Tensor[] square_avgs, "
      "Tensor[] acc_deltas, Tensor[] state_steps, *, float lr, float rho, float eps, "
      "float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "check_fused_adadelta.tensor_lr(Tensor[] params, Tensor[] grads, "
      "Tensor[] square_avgs, Tensor[] acc_deltas, Tensor[] state_steps, *, Tensor lr, "
      "float rho, float eps, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, bool round_lr_product=False) -> ()");
  // Which instruction set the CPU kernel runs with ("AVX512", "AVX2", "DEFAULT"),
  // and those built that it could run with (see cpu/adadelta_cpu_kernel.h).
  m.def("cpu_kernel_isa() -> str", &cpu::kernel_isa);
  m.def("cpu_kernel_isas() -> str[]", &cpu::kernel_isas);
}

TORCH_LIBRARY_IMPL(adadelta_ext, ADInplaceOrView, m) {
  m.impl("fused_adadelta_", torch::CppFunction::makeFromBoxedFunction<&bump_versions_of_written_tensors>());
  m.impl(
      "fused_adadelta_.tensor_lr",
      torch::CppFunction::makeFromBoxedFunction<&bump_versions_of_written_tensors>());
}

TORCH_LIBRARY_IMPL(adadelta_ext, Meta, m) {
  ADADELTA_IMPL_BOTH_OVERLOADS(m, &check_only);
}

TORCH_LIBRARY_IMPL(adadelta_ext, CompositeExplicitAutograd, m) {
  m.impl("check_fused_adadelta", &fused_adadelta_kernel<&check_only>);
  m.impl("check_fused_adadelta.tensor_lr", &fused_adadelta_tensor_lr_kernel<&check_only>);
}

TORCH_LIBRARY_IMPL(adadelta_ext, SparseCPU, m) {
  ADADELTA_IMPL_BOTH_OVERLOADS(m, &refuse_sparse);
}

TORCH_LIBRARY_IMPL(adadelta_ext, SparseCUDA, m) {
  ADADELTA_IMPL_BOTH_OVERLOADS(m, &refuse_sparse);
}

} // namespace adadelta_ext

// `import adadelta_ext._C` loads this library, which runs the registrations
// above; the module itself is empty (ops live under torch.ops.adadelta_ext).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
