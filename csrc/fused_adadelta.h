// What every backend of adadelta_ext::fused_adadelta_ shares: the op's scalar
// arguments, and the adapter that checks a call once before any backend runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "fused_adadelta_inputs.h"

namespace adadelta_ext {

// One backend's implementation. It is called with lists that passed
// check_fused_adadelta_call: non-empty, real (complex tensors already viewed
// as pairs of reals), and with no param sharing memory with another.
using FusedAdadeltaImpl = void (*)(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps,
    const FusedAdadeltaOptions& options);

// Checks every argument before Impl changes anything, then calls it: once, or
// once per param, in order, when params overlap (views of one tensor), so
// that each sees the updates before it, as torch.optim.Adadelta's for-loop does.
template <FusedAdadeltaImpl Impl>
void checked_call(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps,
    const FusedAdadeltaOptions& options) {
  const CheckedCall call =
      check_fused_adadelta_call(params, grads, square_avgs, acc_deltas, state_steps, options);
  if (params.empty()) {
    return;
  }
  const RealTensorLists real(params, grads, square_avgs, acc_deltas);
  if (!call.params_overlap) {
    Impl(real.params, real.grads, real.square_avgs, real.acc_deltas, state_steps, options);
    return;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    Impl(
        real.params[i], real.grads[i], real.square_avgs[i], real.acc_deltas[i],
        state_steps[i], options);
  }
}

// The op's two overloads (float lr, tensor lr) as kernels for m.impl, both
// reaching checked_call<Impl>, so each backend writes its implementation once.
template <FusedAdadeltaImpl Impl>
struct FusedAdadeltaOverloads {
  static void float_lr(
      at::TensorList params,
      at::TensorList grads,
      at::TensorList square_avgs,
      at::TensorList acc_deltas,
      at::TensorList state_steps,
      double lr,
      double rho,
      double eps,
      double weight_decay,
      bool maximize,
      const std::optional<at::Tensor>& grad_scale,
      const std::optional<at::Tensor>& found_inf) {
    checked_call<Impl>(
        params, grads, square_avgs, acc_deltas, state_steps,
        {lr, std::nullopt, rho, eps, weight_decay, maximize, grad_scale, found_inf});
  }

  static void tensor_lr(
      at::TensorList params,
      at::TensorList grads,
      at::TensorList square_avgs,
      at::TensorList acc_deltas,
      at::TensorList state_steps,
      const at::Tensor& lr,
      double rho,
      double eps,
      double weight_decay,
      bool maximize,
      const std::optional<at::Tensor>& grad_scale,
      const std::optional<at::Tensor>& found_inf) {
    checked_call<Impl>(
        params, grads, square_avgs, acc_deltas, state_steps,
        {0.0, lr, rho, eps, weight_decay, maximize, grad_scale, found_inf});
  }
};

} // namespace adadelta_ext
