// torch.classes.adadelta_ext.KeptStepLists: the tensor lists of one
// fused_adadelta_ call, kept between steps so that FusedAdadelta's step does
// not rebuild them (and convert them from Python, tensor by tensor) each time.
// Only the grads change from step to step: they are read here, from each
// param. See FusedAdadelta._step_kept_lists for when the lists are kept.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "fused_adadelta.h"

namespace adadelta_ext {
namespace {

class KeptStepLists : public torch::CustomClassHolder {
 public:
  KeptStepLists(
      std::vector<at::Tensor> params,
      std::vector<at::Tensor> square_avgs,
      std::vector<at::Tensor> acc_deltas,
      std::vector<at::Tensor> state_steps,
      std::vector<at::Tensor> compensations,
      std::vector<int64_t> stochastic_round_seeds)
      : params_(std::move(params)),
        square_avgs_(std::move(square_avgs)),
        acc_deltas_(std::move(acc_deltas)),
        state_steps_(std::move(state_steps)),
        compensations_(std::move(compensations)),
        stochastic_round_seeds_(std::move(stochastic_round_seeds)) {
    layouts_.reserve(params_.size());
    for (const at::Tensor& param : params_) {
      layouts_.push_back(
          {param.scalar_type(), param.device(), param.sizes().vec(), param.strides().vec()});
    }
    grads_.reserve(params_.size());
  }

  // Whether the lists still hold: every param has a grad and the dtype,
  // device, shape and strides it had when its state was made or converted.
  bool ready() const {
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& param = params_[i];
      const Layout& layout = layouts_[i];
      if (!param.grad().defined() || param.scalar_type() != layout.dtype ||
          param.device() != layout.device || param.sizes() != at::IntArrayRef(layout.sizes) ||
          param.strides() != at::IntArrayRef(layout.strides)) {
        return false;
      }
    }
    return true;
  }

  // fused_adadelta_ (or, with check_only, check_fused_adadelta) on the kept
  // lists and each param's grad now. The caller has seen ready().
  void call(
      bool check_only,
      double lr,
      std::optional<at::Tensor> lr_tensor,
      double rho,
      double eps,
      double weight_decay,
      bool maximize,
      std::optional<at::Tensor> grad_scale,
      std::optional<at::Tensor> found_inf,
      bool round_lr_product) {
    grads_.clear();
    for (const at::Tensor& param : params_) {
      grads_.push_back(param.grad());
    }
    // Empty for none: the lists are kept for one or more params.
    const CompensationsArgument compensations = compensations_.empty()
        ? std::nullopt
        : CompensationsArgument(compensations_);
    const SeedsArgument seeds = stochastic_round_seeds_.empty()
        ? SeedsArgument()
        : SeedsArgument(stochastic_round_seeds_);
    if (lr_tensor.has_value()) {
      static const auto ops = typed_ops<const at::Tensor&, bool, CompensationsArgument, SeedsArgument>();
      ops[check_only].call(
          params_, grads_, square_avgs_, acc_deltas_, state_steps_, *lr_tensor, rho, eps,
          weight_decay, maximize, grad_scale, found_inf, round_lr_product, compensations, seeds);
    } else {
      static const auto ops = typed_ops<double, CompensationsArgument, SeedsArgument>();
      ops[check_only].call(
          params_, grads_, square_avgs_, acc_deltas_, state_steps_, lr, rho, eps, weight_decay,
          maximize, grad_scale, found_inf, compensations, seeds);
    }
    grads_.clear();  // no reference to a grad outlives the step
  }

 private:
  struct Layout {
    at::ScalarType dtype;
    at::Device device;
    std::vector<int64_t> sizes;
    std::vector<int64_t> strides;
  };

  // The op's overload for Lr as {fused_adadelta_, check_fused_adadelta}.
  template <typename Lr, typename... Tail>
  static std::array<c10::TypedOperatorHandle<FusedAdadeltaSignature<Lr, Tail...>>, 2> typed_ops() {
    return {
        typed_overload<Lr, Tail...>("adadelta_ext::fused_adadelta_"),
        typed_overload<Lr, Tail...>("adadelta_ext::check_fused_adadelta")};
  }

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> square_avgs_;
  std::vector<at::Tensor> acc_deltas_;
  std::vector<at::Tensor> state_steps_;
  std::vector<at::Tensor> compensations_;
  std::vector<int64_t> stochastic_round_seeds_;
  std::vector<Layout> layouts_;
  std::vector<at::Tensor> grads_;
};

} // namespace

TORCH_LIBRARY_FRAGMENT(adadelta_ext, m) {
  m.class_<KeptStepLists>("KeptStepLists")
      .def(torch::init<
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>>())
      .def("ready", &KeptStepLists::ready)
      .def("call", &KeptStepLists::call);
}

} // namespace adadelta_ext
