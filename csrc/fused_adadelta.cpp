// adadelta_ext's entry point: the op definitions, and the kernels every
// backend shares (autograd's version counters, meta, sparse refusal). The
// device implementations live in cpu/ and cuda/; each checks its call through
// checked_call (fused_adadelta.h) before changing anything.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/adadelta_cpu_kernel.h"
#include "fused_adadelta.h"

namespace adadelta_ext {
namespace {

// For the meta device (shapes only, as torch.compile traces) and the check op:
// the checks alone.
void check_only(const FusedAdadeltaTensors& /*tensors*/, const FusedAdadeltaOptions& /*options*/) {}

} // namespace

template <>
constexpr bool kChecksOnly<&check_only> = true;

namespace {

// Sparse grads select the op's sparse dispatch keys: refuse them there, after
// the checks every dense backend runs (and with their messages).
void refuse_sparse(const FusedAdadeltaTensors& /*tensors*/, const FusedAdadeltaOptions& /*options*/) {
  TORCH_CHECK(false, "fused_adadelta_: FusedAdadelta does not support sparse gradients");
}

void refuse_grad_mode(at::TensorList tensors, const char* list_name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(
        !tensors[i].requires_grad(), "fused_adadelta_: ", list_name, "[", i,
        "] requires grad and grad mode is on, but the op has no derivative: call it under "
        "torch.no_grad(), as an optimizer step does");
  }
}

// The version counters of the tensors a call writes, bumped before it runs.
// NOTE [Versions bumped first]
// ATen's generated kernels bump the counters after the op. Here that would
// touch every tensor once more after the kernel has streamed all of them
// through the caches: for a thousand small params, a measurable part of the
// step. So they are bumped before, and a call that raises (a refused step,
// which must change nothing) puts them back. No other code runs in between.
class BumpedVersions {
 public:
  void bump(at::TensorList tensors) {
    lists_.push_back(tensors);
    for (const at::Tensor& tensor : tensors) {
      const c10::VariableVersion& counter = tensor.unsafeGetTensorImpl()->version_counter();
      // Inference tensors (in InferenceMode) have no counter: nothing to bump or put back.
      if (counter.enabled()) {
        versions_.push_back(counter.current_version());
        torch::autograd::impl::bump_version(tensor);
      }
    }
  }

  void restore() const {
    size_t next = 0;
    for (const at::TensorList tensors : lists_) {
      for (const at::Tensor& tensor : tensors) {
        c10::VariableVersion counter = tensor.unsafeGetTensorImpl()->version_counter();
        if (counter.enabled()) {
          counter.set_version(versions_[next++]);
        }
      }
    }
  }

 private:
  std::vector<at::TensorList> lists_;
  std::vector<uint32_t> versions_;  // before the bump, in the order of lists_
};

// What ATen's generated Autograd and ADInplaceOrView kernels do for an in-place
// op without a derivative: refuse tensors autograd would have to follow (at
// the Autograd key, in grad mode), bump the version counter of every tensor
// the op writes, so that autograd refuses a backward through a tensor the step
// changed, and run the op. Grads count as written only when grad_scale
// unscales them. Unboxed, as a step with thousands of tensors would otherwise
// pay for boxing them.
template <bool kAutograd, typename Lr, typename... Tail>
void bump_versions_of_written_tensors(
    c10::DispatchKeySet keys,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps,
    Lr lr,
    double rho,
    double eps,
    double weight_decay,
    bool maximize,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf,
    Tail... tail) {
  // compensations: the second-to-last argument of both overloads.
  const CompensationsArgument& compensations = std::get<sizeof...(Tail) - 2>(std::tie(tail...));
  struct WrittenList {
    at::TensorList tensors;
    const char* name;
  };
  std::vector<WrittenList> written = {
      {params, "params"},
      {square_avgs, "square_avgs"},
      {acc_deltas, "acc_deltas"},
      {state_steps, "state_steps"}};
  if (grad_scale.has_value()) {
    written.push_back({grads, "grads"});
  }
  if (compensations.has_value()) {
    written.push_back({*compensations, "compensations"});
  }
  if (kAutograd && at::GradMode::is_enabled()) {
    for (const WrittenList& list : written) {
      refuse_grad_mode(list.tensors, list.name);
    }
  }
  BumpedVersions versions;  // see NOTE [Versions bumped first]
  for (const WrittenList& list : written) {
    versions.bump(list.tensors);
  }
  static const auto op = typed_overload<Lr, Tail...>("adadelta_ext::fused_adadelta_");
  try {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(
        keys & c10::after_ADInplaceOrView_keyset, params, grads, square_avgs, acc_deltas,
        state_steps, lr, rho, eps, weight_decay, maximize, grad_scale, found_inf, tail...);
  } catch (...) {
    versions.restore();
    throw;
  }
}

// Both overloads' version-bumping kernels for one key.
template <bool kAutograd>
void impl_bump_versions(torch::Library& m) {
  m.impl(
      "fused_adadelta_",
      TORCH_FN((bump_versions_of_written_tensors<
                kAutograd, double, CompensationsArgument, SeedsArgument>)));
  m.impl(
      "fused_adadelta_.tensor_lr",
      TORCH_FN((bump_versions_of_written_tensors<
                kAutograd, const at::Tensor&, bool, CompensationsArgument, SeedsArgument>)));
}

// NOTE [Grads behind a lazy bit]
// torch.optim.Adadelta reads a grad for its values, whatever holds them: a view
// with the negative bit (x.conj().imag) or the conjugate bit (x.conj()), or a
// ZeroTensor (torch._efficientzerotensor: zeros, and no memory). Such a tensor
// selects the ZeroTensor, Negative or Conjugate key, in that order below
// ADInplaceOrView (whose kernel has bumped the versions by then), where torch's
// fallbacks refuse it in a mutable list, as grads is (for grad_scale). The
// kernel below, at all three keys, replaces each read-only grad that has one
// with a tensor of its values, and calls on below all three. A written tensor
// is left as it is, for the checks to refuse (check_writable): writing through
// the bit would store the values negated or conjugated, and a ZeroTensor has no
// memory to write. So are grads under grad_scale, which unscales them in place:
// unscaling a copy would leave the caller's grad scaled. The check op takes the
// same kernel, so that it refuses what the op refuses, before any call writes.
constexpr c10::DispatchKeySet kBelowLazyBits(
    c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::Conjugate);

template <bool kCheckOp, typename Lr, typename... Tail>
void resolve_read_only_grads(
    c10::DispatchKeySet keys,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps,
    Lr lr,
    double rho,
    double eps,
    double weight_decay,
    bool maximize,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf,
    Tail... tail) {
  std::vector<at::Tensor> resolved;
  for (size_t i = 0; !grad_scale.has_value() && i < grads.size(); ++i) {
    const at::Tensor& grad = grads[i];
    if (grad.defined() && (grad.is_neg() || grad.is_conj() || grad._is_zerotensor())) {
      if (resolved.empty()) {
        resolved = grads.vec();
      }
      resolved[i] = grad._is_zerotensor() ? at::zeros(grad.sizes(), grad.options())
                                          : grad.resolve_conj().resolve_neg();
    }
  }
  static const auto op = typed_overload<Lr, Tail...>(
      kCheckOp ? "adadelta_ext::check_fused_adadelta" : "adadelta_ext::fused_adadelta_");
  op.redispatch(
      keys & kBelowLazyBits, params, resolved.empty() ? grads : at::TensorList(resolved),
      square_avgs, acc_deltas, state_steps, lr, rho, eps, weight_decay, maximize, grad_scale,
      found_inf, tail...);
}

// Both overloads' kernels of the op or the check op for one of the lazy bits' keys.
template <bool kCheckOp>
void impl_resolve_read_only_grads(torch::Library& m) {
  m.impl(
      kCheckOp ? "check_fused_adadelta" : "fused_adadelta_",
      TORCH_FN((resolve_read_only_grads<kCheckOp, double, CompensationsArgument, SeedsArgument>)));
  m.impl(
      kCheckOp ? "check_fused_adadelta.tensor_lr" : "fused_adadelta_.tensor_lr",
      TORCH_FN((resolve_read_only_grads<
                kCheckOp, const at::Tensor&, bool, CompensationsArgument, SeedsArgument>)));
}

void impl_lazy_bit_kernels(torch::Library& m) {
  impl_resolve_read_only_grads</*kCheckOp=*/false>(m);
  impl_resolve_read_only_grads</*kCheckOp=*/true>(m);
}

} // namespace

TORCH_LIBRARY(adadelta_ext, m) {
  // Modelled on aten::_fused_adam_: one call updates a whole list of tensors
  // in place. grads are mutable because, when grad_scale is given, the
  // kernel unscales them in place as GradScaler.unscale_ would.
  // Each state_steps[i] is incremented by one, unless found_inf is set.
  // compensations (Kahan summation) or stochastic_round_seeds (stochastic
  // rounding), for float16/bfloat16 params: how the param is rounded (see
  // adadelta_math.h).
  // round_lr_product (tensor lr only): param + update * (-lr) with two
  // roundings, as torch.optim.Adadelta(capturable=True) computes a tensor lr
  // step; otherwise one fused multiply-add, as it computes every other step.
  m.def(
      "fused_adadelta_(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] square_avgs, Tensor(d!)[] acc_deltas, "
      "Tensor(e!)[] state_steps, *, float lr, float rho, float eps, "
      "float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(f!)[]? compensations=None, "
      "int[]? stochastic_round_seeds=None) -> ()");
  m.def(
      "fused_adadelta_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] square_avgs, Tensor(d!)[] acc_deltas, "
      "Tensor(e!)[] state_steps, *, Tensor lr, float rho, float eps, "
      "float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, bool round_lr_product=False, "
      "Tensor(f!)[]? compensations=None, int[]? stochastic_round_seeds=None) -> ()");
  // Raises what fused_adadelta_ would raise for the same arguments, and changes
  // nothing: an optimizer making several calls checks them all first.
  m.def(
      "check_fused_adadelta(Tensor[] params, Tensor[] grads, Tensor[] square_avgs, "
      "Tensor[] acc_deltas, Tensor[] state_steps, *, float lr, float rho, float eps, "
      "float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor[]? compensations=None, "
      "int[]? stochastic_round_seeds=None) -> ()");
  m.def(
      "check_fused_adadelta.tensor_lr(Tensor[] params, Tensor[] grads, "
      "Tensor[] square_avgs, Tensor[] acc_deltas, Tensor[] state_steps, *, Tensor lr, "
      "float rho, float eps, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, bool round_lr_product=False, "
      "Tensor[]? compensations=None, int[]? stochastic_round_seeds=None) -> ()");
  // Which instruction set the CPU kernel runs with ("AVX512", "AVX2", "DEFAULT"),
  // and those built that it could run with (see cpu/adadelta_cpu_kernel.h).
  m.def("cpu_kernel_isa() -> str", &cpu::kernel_isa);
  m.def("cpu_kernel_isas() -> str[]", &cpu::kernel_isas);
}

TORCH_LIBRARY_IMPL(adadelta_ext, Autograd, m) {
  impl_bump_versions</*kAutograd=*/true>(m);
  // The check op writes nothing: autograd has nothing to do.
  m.impl("check_fused_adadelta", torch::CppFunction::makeFallthrough());
  m.impl("check_fused_adadelta.tensor_lr", torch::CppFunction::makeFallthrough());
}

// Reached without the Autograd kernel where autograd is excluded but version
// counters are not (e.g. below torch.compile's AOTAutograd).
TORCH_LIBRARY_IMPL(adadelta_ext, ADInplaceOrView, m) {
  impl_bump_versions</*kAutograd=*/false>(m);
}

// See NOTE [Grads behind a lazy bit].
TORCH_LIBRARY_IMPL(adadelta_ext, ZeroTensor, m) {
  impl_lazy_bit_kernels(m);
}

TORCH_LIBRARY_IMPL(adadelta_ext, Negative, m) {
  impl_lazy_bit_kernels(m);
}

TORCH_LIBRARY_IMPL(adadelta_ext, Conjugate, m) {
  impl_lazy_bit_kernels(m);
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
