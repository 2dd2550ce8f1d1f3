// What every backend of adadelta_ext::fused_adadelta_ shares: the op's scalar
// arguments, and the adapter that checks a call once before any backend runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <type_traits>

#include "fused_adadelta_inputs.h"

namespace adadelta_ext {

// One backend's implementation. It is called with tensors that passed
// check_fused_adadelta_call: non-empty lists, real (complex tensors already
// viewed as pairs of reals), and with no param sharing memory with another.
using FusedAdadeltaImpl = void (*)(
    const FusedAdadeltaTensors& tensors,
    const FusedAdadeltaOptions& options);

// Checks every argument before Impl changes anything, then calls it: once, or
// once per param, in order, when params overlap (views of one tensor), so
// that each sees the updates before it, as torch.optim.Adadelta's for-loop does.
template <FusedAdadeltaImpl Impl>
void checked_call(const FusedAdadeltaTensors& tensors, const FusedAdadeltaOptions& options) {
  const CheckedCall call = check_fused_adadelta_call(tensors, options);
  if (tensors.params.empty()) {
    return;
  }
  const RealTensors real(tensors);
  if (!call.params_overlap) {
    Impl(real.tensors, options);
    return;
  }
  const auto& [params, grads, square_avgs, acc_deltas, state_steps] = real.tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    Impl({params[i], grads[i], square_avgs[i], acc_deltas[i], state_steps[i]}, options);
  }
}

// The op's schema as a kernel for m.impl, reaching checked_call<Impl>: Lr is
// double for the op's default overload, const at::Tensor& for .tensor_lr.
template <FusedAdadeltaImpl Impl, typename Lr>
void fused_adadelta_kernel(
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
    const std::optional<at::Tensor>& found_inf) {
  FusedAdadeltaOptions options{0.0, std::nullopt, rho, eps, weight_decay, maximize, grad_scale, found_inf};
  if constexpr (std::is_same_v<Lr, double>) {
    options.lr = lr;
  } else {
    options.lr_tensor = lr;
  }
  checked_call<Impl>({params, grads, square_avgs, acc_deltas, state_steps}, options);
}

// Registers Impl as the kernel of both overloads for one dispatch key.
#define ADADELTA_IMPL_BOTH_OVERLOADS(m, Impl)                          \
  m.impl("fused_adadelta_", &fused_adadelta_kernel<Impl, double>); \
  m.impl("fused_adadelta_.tensor_lr", &fused_adadelta_kernel<Impl, const at::Tensor&>)

} // namespace adadelta_ext
