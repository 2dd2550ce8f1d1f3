// torch.classes.adadelta_ext.KeptStepLists: the tensor lists of one
// fused_adadelta_ call, kept between steps so that FusedAdadelta's step does
// not rebuild them (and convert them from Python, tensor by tensor) each time.
// Only the grads change from step to step: they are read here, from each
// param, in the same pass that checks that the lists still hold. See
// FusedAdadelta._step_kept_calls for when the lists are kept.
#include <c10/core/impl/TorchDispatchModeTLS.h>
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
      layouts_.push_back({param.scalar_type(), param.device(), param.dim(), dims_.size()});
      dims_.insert(dims_.end(), param.sizes().begin(), param.sizes().end());
      dims_.insert(dims_.end(), param.strides().begin(), param.strides().end());
    }
    grads_.reserve(params_.size());
  }

  // fused_adadelta_ (or, with check_only, check_fused_adadelta) on the kept
  // lists and each param's grad now, if the lists still hold: every param has
  // a grad and the dtype, device, shape and strides it had when its state was
  // made or converted. Returns false, having called nothing, if they do not.
  bool call(
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
    const BorrowedGrads grads(*this);
    if (grads_.size() != params_.size()) {
      return false;
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
    return true;
  }

 private:
  struct Layout {
    at::ScalarType dtype;
    at::Device device;
    int64_t dim;
    size_t dims_begin;  // where its sizes, then its strides, start in dims_
  };

  // Whether param i still has the layout it was kept with.
  bool has_kept_layout(size_t i) const {
    const at::Tensor& param = params_[i];
    const Layout& layout = layouts_[i];
    if (param.scalar_type() != layout.dtype || param.device() != layout.device ||
        param.dim() != layout.dim) {
      return false;
    }
    const at::IntArrayRef sizes(dims_.data() + layout.dims_begin, layout.dim);
    const at::IntArrayRef strides(dims_.data() + layout.dims_begin + layout.dim, layout.dim);
    return param.sizes() == sizes && param.strides() == strides;
  }

  // NOTE [Borrowed grads]
  // The params' grads in grads_, for the length of one call, without taking a
  // reference: giving one back after the kernel would touch each grad once more,
  // after the kernel's streaming has evicted it from the caches (for a thousand
  // small params, a measurable part of the step). The params hold the grads
  // throughout the call, as no code that could drop one runs in it; where
  // Python code could (a dispatch mode, or a grad of a Python subclass), the
  // grads are referenced as usual. Fills grads_ only if every param is ready
  // (see call()); empties it on destruction, however the call ends.
  class BorrowedGrads {
   public:
    explicit BorrowedGrads(KeptStepLists& lists) : grads_(lists.grads_) {
      bool python_may_run = c10::impl::TorchDispatchModeTLS::stack_len() > 0;
      for (size_t i = 0; i < lists.params_.size(); ++i) {
        const at::Tensor& grad = lists.params_[i].grad();
        if (!grad.defined() || !lists.has_kept_layout(i)) {
          release();
          return;
        }
        python_may_run = python_may_run || grad.key_set().has(c10::DispatchKey::Python);
        grads_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(grad));
      }
      if (python_may_run) {
        for (at::Tensor& grad : grads_) {
          at::Tensor reference = grad;
          c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(grad);
          grad = std::move(reference);
        }
        referenced_ = true;
      }
    }
    ~BorrowedGrads() {
      release();
    }
    BorrowedGrads(const BorrowedGrads&) = delete;
    BorrowedGrads& operator=(const BorrowedGrads&) = delete;

   private:
    void release() {
      if (!referenced_) {
        for (at::Tensor& grad : grads_) {
          c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(grad);
        }
      }
      grads_.clear();
    }
    std::vector<at::Tensor>& grads_;
    bool referenced_ = false;  // grads_ holds references of its own
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
  std::vector<int64_t> dims_;  // every param's sizes and strides, one after another
  std::vector<at::Tensor> grads_;  // borrowed, during a call only
};

} // namespace

TORCH_LIBRARY_FRAGMENT(adadelta_ext, m) {
  m.class_<KeptStepLists>("KeptStepLists")
      .def(torch::init<
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>>())
      .def("call", &KeptStepLists::call);
}

} // namespace adadelta_ext
