// What every backend of adadelta_ext::fused_adadelta_ shares: the op's scalar
// arguments, and the adapter that checks a call once before any backend runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <type_traits>

#include "fused_adadelta_inputs.h"

namespace adadelta_ext {

// One backend's implementation. It is called with tensors that passed
// check_fused_adadelta_call: non-empty lists, real (complex tensors already
// viewed as pairs of reals), with no param sharing memory with another, and
// no grad sharing memory with a tensor it writes (see GradCopies).
using FusedAdadeltaImpl = void (*)(
    const FusedAdadeltaTensors& tensors,
    const FusedAdadeltaOptions& options);

// Whether Impl runs its kernel from CheckedCall::flat_params (the CPU op, which
// specializes this): only for such an Impl does the check pass record them.
// The check op and the other backends leave every tensor's data as it is.
template <FusedAdadeltaImpl Impl>
constexpr bool kRunsFromFlatParams = false;

// Whether Impl is the checks alone (the meta kernel, the check op), for which
// checked_call neither copies nor views a tensor after the checks.
template <FusedAdadeltaImpl Impl>
constexpr bool kChecksOnly = false;

// Checks every argument before Impl changes anything, then calls it, with
// copies of the grads it must not read in place (NOTE [Grads read through a
// copy]): once, or once per param, in order, when params overlap (views of one
// tensor, or one param listed twice), so that each sees the updates before it,
// as torch.optim.Adadelta's for-loop does.
template <FusedAdadeltaImpl Impl>
void checked_call(const FusedAdadeltaTensors& tensors, const FusedAdadeltaOptions& options) {
  CheckedCall call = check_fused_adadelta_call(tensors, options, kRunsFromFlatParams<Impl>);
  if (kChecksOnly<Impl> || tensors.params.empty()) {
    return;
  }
  const GradCopies copies(tensors, call);
  RealTensors real(copies.tensors, call.any_complex);
  if (!call.params_overlap) {
    real.tensors.flat_params = call.flat_params.empty() ? nullptr : &call.flat_params;
    Impl(real.tensors, options);
    return;
  }
  for (size_t i = 0; i < real.tensors.params.size(); ++i) {
    Impl(real.tensors.entry(i), options);
  }
}

inline std::optional<at::IntArrayRef> optional_list(at::OptionalIntArrayRef list) {
  return list.has_value() ? std::optional<at::IntArrayRef>(*list) : std::nullopt;
}

// The op's schema as kernels for m.impl, reaching checked_call<Impl>: the
// default overload (a number lr) and .tensor_lr.
template <FusedAdadeltaImpl Impl>
void fused_adadelta_kernel(
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
    const std::optional<at::Tensor>& found_inf,
    std::optional<at::TensorList> compensations,
    at::OptionalIntArrayRef stochastic_round_seeds) {
  checked_call<Impl>(
      {params, grads, square_avgs, acc_deltas, state_steps, compensations,
       optional_list(stochastic_round_seeds)},
      {lr, std::nullopt, false, rho, eps, weight_decay, maximize, grad_scale, found_inf});
}

template <FusedAdadeltaImpl Impl>
void fused_adadelta_tensor_lr_kernel(
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
    const std::optional<at::Tensor>& found_inf,
    bool round_lr_product,
    std::optional<at::TensorList> compensations,
    at::OptionalIntArrayRef stochastic_round_seeds) {
  checked_call<Impl>(
      {params, grads, square_avgs, acc_deltas, state_steps, compensations,
       optional_list(stochastic_round_seeds)},
      {0.0, lr, round_lr_product, rho, eps, weight_decay, maximize, grad_scale, found_inf});
}

// The op's C++ signature: Lr is the lr argument's type (double, or const
// at::Tensor& for .tensor_lr), Tail the arguments after found_inf.
using CompensationsArgument = std::optional<at::TensorList>;
using SeedsArgument = at::OptionalIntArrayRef;
template <typename Lr, typename... Tail>
using FusedAdadeltaSignature = void(
    at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, Lr, double,
    double, double, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    Tail...);

// The overload of `op` (adadelta_ext::fused_adadelta_ or check_fused_adadelta)
// whose lr argument has the type Lr, for calls without boxing.
template <typename Lr, typename... Tail>
c10::TypedOperatorHandle<FusedAdadeltaSignature<Lr, Tail...>> typed_overload(const char* op) {
  const char* overload = std::is_same_v<Lr, double> ? "" : "tensor_lr";
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(op, overload)
      .template typed<FusedAdadeltaSignature<Lr, Tail...>>();
}

// Registers Impl as the kernel of both overloads for one dispatch key.
#define ADADELTA_IMPL_BOTH_OVERLOADS(m, Impl)                 \
  m.impl("fused_adadelta_", &fused_adadelta_kernel<Impl>); \
  m.impl("fused_adadelta_.tensor_lr", &fused_adadelta_tensor_lr_kernel<Impl>)

} // namespace adadelta_ext
