// The op schema, registered once, and the checks every backend runs.
#include "fused_adadelta.h"

#include <Python.h>
#include <torch/library.h>

namespace adadelta_ext {

namespace {

bool is_supported_param_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
      dtype == at::kBFloat16;
}

void check_scalar_tensor(
    const std::optional<at::Tensor>& tensor,
    const char* name,
    const at::Device& device) {
  if (!tensor.has_value()) {
    return;
  }
  TORCH_CHECK(
      tensor->numel() == 1,
      "fused_adadelta_: ", name, " must have one element, got ",
      tensor->numel());
  TORCH_CHECK(
      at::isFloatingType(tensor->scalar_type()),
      "fused_adadelta_: ", name, " must be a floating-point tensor, got ",
      tensor->scalar_type());
  TORCH_CHECK(
      tensor->device() == device,
      "fused_adadelta_: ", name, " is on ", tensor->device(),
      " but the params are on ", device);
}

void check_companion(
    const at::Tensor& tensor,
    const at::Tensor& param,
    const char* list_name,
    size_t index) {
  TORCH_CHECK(
      tensor.defined(), "fused_adadelta_: ", list_name, "[", index,
      "] is undefined");
  TORCH_CHECK(
      tensor.layout() == at::kStrided, "fused_adadelta_: ", list_name, "[",
      index, "] is sparse; FusedAdadelta does not support sparse gradients");
  TORCH_CHECK(
      tensor.device() == param.device(), "fused_adadelta_: ", list_name, "[",
      index, "] is on ", tensor.device(), " but params[", index, "] is on ",
      param.device());
  TORCH_CHECK(
      tensor.sizes() == param.sizes(), "fused_adadelta_: ", list_name, "[",
      index, "] has shape ", tensor.sizes(), " but params[", index,
      "] has shape ", param.sizes());
}

} // namespace

void check_fused_adadelta_inputs(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps) {
  TORCH_CHECK(
      grads.size() == params.size() && square_avgs.size() == params.size() &&
          acc_deltas.size() == params.size() &&
          state_steps.size() == params.size(),
      "fused_adadelta_: params, grads, square_avgs, acc_deltas and "
      "state_steps must have the same length, got ",
      params.size(), ", ", grads.size(), ", ", square_avgs.size(), ", ",
      acc_deltas.size(), " and ", state_steps.size());
  if (params.empty()) {
    return;
  }
  const at::Device device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(
        param.defined() && param.layout() == at::kStrided,
        "fused_adadelta_: params[", i, "] must be a defined dense tensor");
    TORCH_CHECK(
        param.device() == device, "fused_adadelta_: params[", i, "] is on ",
        param.device(), " but params[0] is on ", device,
        "; one call updates tensors of one device");
    TORCH_CHECK(
        is_supported_param_dtype(param.scalar_type()),
        "fused_adadelta_: params[", i, "] has dtype ", param.scalar_type(),
        "; supported are float32, float64, float16 and bfloat16");
    check_companion(grads[i], param, "grads", i);
    check_companion(square_avgs[i], param, "square_avgs", i);
    check_companion(acc_deltas[i], param, "acc_deltas", i);
    TORCH_CHECK(
        grads[i].scalar_type() == param.scalar_type(), "fused_adadelta_: grads[",
        i, "] has dtype ", grads[i].scalar_type(), " but params[", i,
        "] has dtype ", param.scalar_type());
    const at::ScalarType state_dtype = square_avgs[i].scalar_type();
    TORCH_CHECK(
        acc_deltas[i].scalar_type() == state_dtype &&
            (state_dtype == param.scalar_type() || state_dtype == at::kFloat),
        "fused_adadelta_: square_avgs[", i, "] and acc_deltas[", i,
        "] must both have the dtype of params[", i, "] (",
        param.scalar_type(), ") or float32, got ", state_dtype, " and ",
        acc_deltas[i].scalar_type());
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(
        step.defined() && step.numel() == 1 &&
            (step.scalar_type() == at::kFloat ||
             step.scalar_type() == at::kDouble) &&
            step.device() == device,
        "fused_adadelta_: state_steps[", i,
        "] must be a one-element float32 or float64 tensor on ", device);
  }
}

void check_fused_adadelta_options(
    const at::Device& device,
    const FusedAdadeltaOptions& options) {
  check_scalar_tensor(options.lr_tensor, "lr", device);
  check_scalar_tensor(options.grad_scale, "grad_scale", device);
  check_scalar_tensor(options.found_inf, "found_inf", device);
}

namespace {

bool shares_dense_layout(const at::Tensor& param, const at::Tensor& other) {
  return other.strides() == param.strides();
}

} // namespace

FlatTensorLists::FlatTensorLists(
    at::TensorList params_in,
    at::TensorList grads_in,
    at::TensorList square_avgs_in,
    at::TensorList acc_deltas_in,
    bool grads_are_written)
    : params(params_in.vec()),
      grads(grads_in.vec()),
      square_avgs(square_avgs_in.vec()),
      acc_deltas(acc_deltas_in.vec()),
      original_params_(params_in),
      original_grads_(grads_in),
      original_square_avgs_(square_avgs_in),
      original_acc_deltas_(acc_deltas_in),
      grads_are_written_(grads_are_written) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const bool flat = param.is_non_overlapping_and_dense() &&
        shares_dense_layout(param, grads[i]) &&
        shares_dense_layout(param, square_avgs[i]) &&
        shares_dense_layout(param, acc_deltas[i]);
    if (!flat) {
      params[i] = params[i].contiguous();
      grads[i] = grads[i].contiguous();
      square_avgs[i] = square_avgs[i].contiguous();
      acc_deltas[i] = acc_deltas[i].contiguous();
      copied_.push_back(i);
    }
  }
}

void FlatTensorLists::write_back() const {
  for (const size_t i : copied_) {
    const auto copy_if_needed = [](const at::Tensor& original,
                                   const at::Tensor& flat) {
      if (!original.is_same(flat)) {
        original.copy_(flat);
      }
    };
    copy_if_needed(original_params_[i], params[i]);
    copy_if_needed(original_square_avgs_[i], square_avgs[i]);
    copy_if_needed(original_acc_deltas_[i], acc_deltas[i]);
    if (grads_are_written_) {
      copy_if_needed(original_grads_[i], grads[i]);
    }
  }
}

namespace {

// Validation alone, so that an optimizer stepping params on several devices
// can check every device's lists before it changes any of them.
void check_fused_adadelta_inputs_op(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps) {
  check_fused_adadelta_inputs(params, grads, square_avgs, acc_deltas, state_steps);
}

// Sparse grads select the op's sparse dispatch keys. Refuse them there, with
// the checks (and messages) of every dense backend, before anything changes.
void refuse_sparse(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList square_avgs,
    at::TensorList acc_deltas,
    at::TensorList state_steps,
    const FusedAdadeltaOptions& /*options*/) {
  check_fused_adadelta_inputs(params, grads, square_avgs, acc_deltas, state_steps);
  TORCH_CHECK(false, "fused_adadelta_: FusedAdadelta does not support sparse gradients");
}

} // namespace

TORCH_LIBRARY(adadelta_ext, m) {
  // Modelled on aten::_fused_adam_: one call updates a whole list of tensors
  // in place. grads are mutable because, when grad_scale is given, the
  // kernel unscales them in place as GradScaler.unscale_ would.
  // Each state_steps[i] is incremented by one, unless found_inf is set.
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
      "Tensor? found_inf=None) -> ()");
  m.def(
      "check_fused_adadelta_inputs(Tensor[] params, Tensor[] grads, "
      "Tensor[] square_avgs, Tensor[] acc_deltas, Tensor[] state_steps) -> ()");
}

TORCH_LIBRARY_IMPL(adadelta_ext, CompositeExplicitAutograd, m) {
  m.impl("check_fused_adadelta_inputs", &check_fused_adadelta_inputs_op);
}

TORCH_LIBRARY_IMPL(adadelta_ext, SparseCPU, m) {
  m.impl("fused_adadelta_", &FusedAdadeltaOverloads<&refuse_sparse>::float_lr);
  m.impl("fused_adadelta_.tensor_lr", &FusedAdadeltaOverloads<&refuse_sparse>::tensor_lr);
}

TORCH_LIBRARY_IMPL(adadelta_ext, SparseCUDA, m) {
  m.impl("fused_adadelta_", &FusedAdadeltaOverloads<&refuse_sparse>::float_lr);
  m.impl("fused_adadelta_.tensor_lr", &FusedAdadeltaOverloads<&refuse_sparse>::tensor_lr);
}

} // namespace adadelta_ext

// `import adadelta_ext._C` loads this library, which runs the registrations
// above; the module itself is empty (ops live under torch.ops.adadelta_ext).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
