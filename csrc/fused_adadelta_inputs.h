// The op's arguments: their checks, and the views and copies that let a
// kernel walk each param's tensors as flat arrays.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "adadelta_math.h"

namespace adadelta_ext {

// float16 and bfloat16: the dtypes that compute in float32 and may keep float32 state.
inline bool is_reduced_float(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

// The scalar arguments of one call, as the schema in fused_adadelta.cpp names them.
struct FusedAdadeltaOptions {
  double lr;  // used when lr_tensor is empty
  std::optional<at::Tensor> lr_tensor;  // one element, on the params' device
  // With lr_tensor: param + update * (-lr), rounded twice, as torch.optim's
  // capturable path computes it, rather than one fused multiply-add.
  bool round_lr_product;
  double rho;
  double eps;
  double weight_decay;
  bool maximize;
  std::optional<at::Tensor> grad_scale;  // set by torch.amp.GradScaler
  std::optional<at::Tensor> found_inf;  // set by torch.amp.GradScaler
};

// The step's hyperparameters, in double, with `lr` (options.lr, or the value
// of options.lr_tensor where the caller has read it) and 1 - rho computed in
// double, as torch.optim computes it in Python.
AdadeltaHyperparams<double> adadelta_hyperparams(const FusedAdadeltaOptions& options, double lr);

// One param's tensors as a kernel walks them: flat arrays of numel elements,
// laid out alike, and its step counter.
struct FlatParam {
  void* param;
  void* grad;  // written only when grad_scale unscales it
  void* square_avg;
  void* acc_delta;
  void* compensation;  // nullptr without compensations
  void* step;
  int64_t numel;
  at::ScalarType param_dtype;
  at::ScalarType grad_dtype;
  at::ScalarType state_dtype;
  at::ScalarType step_dtype;
};

// The op's per-param arguments: one entry per param in each list.
struct FusedAdadeltaTensors {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList square_avgs;
  at::TensorList acc_deltas;
  at::TensorList state_steps;
  // FusedAdadelta(kahan_sum=True): each float16/bfloat16 param's compensation
  // buffer (NOTE [Kahan summation] in adadelta_math.h).
  std::optional<at::TensorList> compensations;
  // FusedAdadelta(stochastic_round=True): each float16/bfloat16 param's seed
  // (NOTE [Stochastic rounding] in adadelta_math.h).
  std::optional<at::IntArrayRef> stochastic_round_seeds;
  // Each param's flat arrays as check_fused_adadelta_call recorded them, where
  // it could (see CheckedCall::flat_params); else nullptr, and a backend reads
  // them from the tensors (FlatTensorLists).
  const std::vector<FlatParam>* flat_params = nullptr;

  // The entries of param i alone (without flat_params).
  FusedAdadeltaTensors entry(size_t i) const;

  // How the 16-bit params take their results: the checks allow at most one of
  // compensations and stochastic_round_seeds.
  ParamRounding rounding() const {
    return compensations.has_value() ? ParamRounding::kKahan
        : stochastic_round_seeds.has_value() ? ParamRounding::kStochastic
                                             : ParamRounding::kNearest;
  }
};

// What check_fused_adadelta_call learned that the call must act on.
struct CheckedCall {
  // Some params share memory (views of one tensor, or one param listed twice):
  // update them one at a time.
  bool params_overlap;
  // Some params are complex (see RealTensors).
  bool any_complex;
  // Each param's flat arrays, recorded as the checks read its tensors (NOTE
  // [Checks list by list]) where the caller asked for them and every param is
  // real and flat (its tensors dense and laid out alike, see FlatTensorLists):
  // the common case. Else empty.
  std::vector<FlatParam> flat_params;
  // The indices of read-only grads that share memory with a tensor the op
  // writes, ascending (NOTE [Grads read through a copy]).
  std::vector<uint32_t> copied_grads;
};

// Raises (RuntimeError, naming the list and index and the problem) unless one
// kernel pass can update these tensors without touching memory it must not:
// - equal lengths, one device for every tensor (and for lr, grad_scale and
//   found_inf), matching shapes, dense (strided) layouts;
// - dtypes the kernels are built for: params float32, float64, float16,
//   bfloat16 or complex; grads of the param's dtype or float32; square_avgs and
//   acc_deltas both of the param's dtype, or both float32 for float16/bfloat16;
//   one-element float32/float64 steps;
// - compensations (of the param's shape and dtype) or stochastic_round_seeds,
//   not both, and only for float16/bfloat16 params;
// - no written tensor that is an inference tensor outside InferenceMode (as
//   for ATen's in-place ops), has the negative or conjugate bit, or is a
//   ZeroTensor (NOTE [Grads behind a lazy bit] in fused_adadelta.cpp: read-only
//   grads reach the checks resolved);
// - no written tensor (params, states, and grads when grad_scale unscales them)
//   whose elements share memory, and no two tensors of different roles
//   sharing memory, but for params, which may share memory with each other,
//   and read-only grads, which may share memory with anything (listed in
//   CheckedCall::copied_grads where it is written), and entries that repeat
//   one another whole (a param listed twice, with its grad and state; not
//   with grad_scale), stepped one after the other (params_overlap);
// - a float lr, eps and weight_decay representable in the params' compute
//   type. Their ranges (and rho's) are not checked: torch.optim.Adadelta
//   steps with a negative lr, say, set after __init__, and so does the op.
// The address checks are skipped on the meta device, which has no memory.
// With record_flat_params, also fills CheckedCall::flat_params, reading the
// data of the tensors the op writes for writing.
CheckedCall check_fused_adadelta_call(
    const FusedAdadeltaTensors& tensors,
    const FusedAdadeltaOptions& options,
    bool record_flat_params);

// NOTE [Grads read through a copy]
// Without grad_scale grads are only read, and torch.optim.Adadelta steps with a
// grad that shares memory with a tensor the step writes (p.grad = p.detach(),
// a grad that is a view of another param): its foreach path reads every grad
// before it writes any param (so does its for-loop, for a grad that is its own
// param). The op does the same: each such grad (CheckedCall::copied_grads) is
// read through a copy taken before anything is written, every other grad in
// place, where no write reaches it. With grad_scale grads are written, and
// such sharing is refused.
class GradCopies {
 public:
  // Points call.flat_params at the copies too, where it has records.
  GradCopies(const FusedAdadeltaTensors& tensors, CheckedCall& call);
  GradCopies(const GradCopies&) = delete;
  GradCopies& operator=(const GradCopies&) = delete;

  // The caller's tensors, with the copies in grads.
  FusedAdadeltaTensors tensors;

 private:
  std::vector<at::Tensor> grads_;
};

// The tensors with each complex one viewed as a real one with a trailing
// dimension of 2 (torch.view_as_real), as torch.optim updates complex params.
// Without complex tensors (any_complex false), the caller's lists themselves.
class RealTensors {
 public:
  RealTensors(const FusedAdadeltaTensors& tensors, bool any_complex);
  RealTensors(const RealTensors&) = delete;
  RealTensors& operator=(const RealTensors&) = delete;

  FusedAdadeltaTensors tensors;

 private:
  std::vector<at::Tensor> views_[4];
};

// The kernels walk each param's four tensors as flat arrays with one index.
// That holds when all four are dense and laid out alike (contiguous, or a
// channels_last or transposed param whose state follows its layout). Any
// other param (a sliced view, say) is updated through contiguous copies that
// write_back() copies into the caller's tensors.
class FlatTensorLists {
 public:
  FlatTensorLists(const FusedAdadeltaTensors& tensors, bool grads_are_written);
  FlatTensorLists(const FlatTensorLists&) = delete;
  FlatTensorLists& operator=(const FlatTensorLists&) = delete;

  void write_back() const;

  // Each param's flat arrays, with its step counter from state_steps.
  std::vector<FlatParam> flat_params(at::TensorList state_steps) const;

  // The caller's lists (nothing copied, the common case), or lists holding
  // contiguous copies where a param needs them. compensations is empty
  // without the caller's.
  at::TensorList params;
  at::TensorList grads;
  at::TensorList square_avgs;
  at::TensorList acc_deltas;
  at::TensorList compensations;

 private:
  FusedAdadeltaTensors original_;
  bool grads_are_written_;
  std::vector<at::Tensor> lists_with_copies_[5];
  std::vector<size_t> copied_;
};

} // namespace adadelta_ext
