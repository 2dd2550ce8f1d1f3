// What the CPU and CUDA implementations of adadelta_ext::fused_adadelta_ share:
// the op's arguments, their checks, and the flattening of odd layouts.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace adadelta_ext {

// The scalar arguments of one call, as the schema in fused_adadelta.cpp names them.
struct FusedAdadeltaOptions {
  double lr;  // used when lr_tensor is empty
  std::optional<at::Tensor> lr_tensor;  // one element, on the params' device
  double rho;
  double eps;
  double weight_decay;
  bool maximize;
  std::optional<at::Tensor> grad_scale;  // set by torch.amp.GradScaler
  std::optional<at::Tensor> found_inf;  // set by torch.amp.GradScaler
};

// Raises (RuntimeError, naming the list and index) unless the lists describe
// tensors one kernel pass can update: equal lengths, one device, matching
// shapes, param dtype float32/float64/float16/bfloat16, grad of the param's
// dtype, state of the param's dtype or float32, one-element float steps.
void check_fused_adadelta_inputs(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps);

void check_fused_adadelta_options(
    const at::Device& device,
    const FusedAdadeltaOptions& options);

// One backend's implementation, given the op's scalar arguments as options.
using FusedAdadeltaImpl = void (*)(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps,
    const FusedAdadeltaOptions& options);

// The op's two overloads (float lr, tensor lr) as kernels for m.impl, both
// calling Impl, so each backend writes its implementation once.
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
    Impl(
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
    Impl(
        params, grads, square_avgs, acc_deltas, state_steps,
        {0.0, lr, rho, eps, weight_decay, maximize, grad_scale, found_inf});
  }
};

// The kernels walk each param's four tensors as flat arrays with one index.
// That holds when all four are dense and laid out alike (contiguous, or a
// transposed param whose state was made with zeros_like). Any other param
// (a sliced view, say) is updated through contiguous copies that
// write_back() copies into the caller's tensors.
class FlatTensorLists {
 public:
  FlatTensorLists(
      at::TensorList params,
      at::TensorList grads,
      at::TensorList square_avgs,
      at::TensorList acc_deltas,
      bool grads_are_written);

  void write_back() const;

  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> square_avgs;
  std::vector<at::Tensor> acc_deltas;

 private:
  at::TensorList original_params_;
  at::TensorList original_grads_;
  at::TensorList original_square_avgs_;
  at::TensorList original_acc_deltas_;
  bool grads_are_written_;
  std::vector<size_t> copied_;
};

} // namespace adadelta_ext
