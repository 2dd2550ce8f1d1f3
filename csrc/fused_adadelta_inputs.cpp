// The checks every call of the op passes before anything changes, and the
// views and copies that hand a kernel flat arrays.
#include "fused_adadelta_inputs.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/TypeCast.h>

#include <algorithm>
#include <array>
#include <cstdint>

namespace adadelta_ext {
namespace {

bool is_supported_param_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || is_reduced_float(dtype) ||
      dtype == at::kComplexFloat || dtype == at::kComplexDouble;
}

// float16, bfloat16 and float32 params (and complex64) compute in float32.
bool computes_in_float32(at::ScalarType param_dtype) {
  return param_dtype != at::kDouble && param_dtype != at::kComplexDouble;
}

void check_companion(
    const at::Tensor& tensor,
    const at::Tensor& param,
    const char* list_name,
    size_t index) {
  TORCH_CHECK(
      tensor.defined(), "fused_adadelta_: ", list_name, "[", index, "] is undefined");
  TORCH_CHECK(
      tensor.layout() == at::kStrided, "fused_adadelta_: ", list_name, "[", index,
      "] is sparse; FusedAdadelta does not support sparse gradients");
  TORCH_CHECK(
      tensor.device() == param.device(), "fused_adadelta_: ", list_name, "[", index,
      "] is on ", tensor.device(), " but params[", index, "] is on ", param.device());
  TORCH_CHECK(
      tensor.sizes() == param.sizes(), "fused_adadelta_: ", list_name, "[", index,
      "] has shape ", tensor.sizes(), " but params[", index, "] has shape ",
      param.sizes());
}

// square_avgs[i] and acc_deltas[i]: both of the param's dtype, or both float32 for float16/bfloat16.
void check_state_dtypes(
    const at::Tensor& param,
    const at::Tensor& square_avg,
    const at::Tensor& acc_delta,
    size_t i) {
  const at::ScalarType dtype = param.scalar_type();
  const at::ScalarType state_dtype = square_avg.scalar_type();
  TORCH_CHECK(
      acc_delta.scalar_type() == state_dtype &&
          (state_dtype == dtype || (state_dtype == at::kFloat && is_reduced_float(dtype))),
      "fused_adadelta_: square_avgs[", i, "] and acc_deltas[", i,
      "] must both have the dtype of params[", i, "] (", dtype, ")",
      is_reduced_float(dtype) ? " or both float32" : "", ", got ", state_dtype, " and ",
      acc_delta.scalar_type());
}

// A tensor the op writes: not an inference tensor outside InferenceMode (as
// ATen refuses an in-place op on one), and its memory holds its values (NOTE
// [Grads behind a lazy bit] in fused_adadelta.cpp).
void check_writable(const at::Tensor& tensor, const char* list_name, size_t index) {
  TORCH_CHECK(
      !tensor.is_inference() || c10::InferenceMode::is_enabled(), "fused_adadelta_: ",
      list_name, "[", index,
      "] is an inference tensor. Inplace update to inference tensor outside "
      "InferenceMode is not allowed. You can make a clone to get a normal tensor "
      "before doing inplace update.");
  TORCH_CHECK(
      !tensor.is_neg(), "fused_adadelta_: ", list_name, "[", index,
      "] is written but has the negative bit set (a lazily negated view, as x.conj().imag "
      "is): a tensor the op writes must hold its own values (resolve_neg() makes one)");
  TORCH_CHECK(
      !tensor.is_conj(), "fused_adadelta_: ", list_name, "[", index,
      "] is written but has the conjugate bit set (a lazily conjugated view, as x.conj() "
      "is): a tensor the op writes must hold its own values (resolve_conj() makes one)");
  TORCH_CHECK(
      !tensor._is_zerotensor(), "fused_adadelta_: ", list_name, "[", index,
      "] is written but is a ZeroTensor (torch._efficientzerotensor), which has no memory");
}

void check_scalar_tensor(
    const std::optional<at::Tensor>& tensor,
    const char* name,
    const at::Device& device,
    bool integers_allowed) {
  if (!tensor.has_value()) {
    return;
  }
  TORCH_CHECK(
      tensor->numel() == 1, "fused_adadelta_: ", name, " must have one element, got ",
      tensor->numel());
  const at::ScalarType dtype = tensor->scalar_type();
  TORCH_CHECK(
      at::isFloatingType(dtype) || (integers_allowed && at::isIntegralType(dtype, false)),
      "fused_adadelta_: ", name, " must be a ",
      integers_allowed ? "real (floating-point or integer)" : "floating-point",
      " tensor, got ", dtype);
  TORCH_CHECK(
      tensor->device() == device, "fused_adadelta_: ", name, " is on ", tensor->device(),
      " but the params are on ", device);
}

// torch raises this for a scalar its float32 kernels cannot hold (lr=1e300).
void check_fits_float32(double value, const char* name) {
  const bool overflows = c10::overflows<float, double>(value);
  TORCH_CHECK(
      !overflows, "fused_adadelta_: ", name, "=", value,
      ": value cannot be converted to type float without overflow");
}

void check_options(
    at::TensorList params,
    const at::Device& device,
    const FusedAdadeltaOptions& options) {
  // No range of lr, rho, eps or weight_decay is checked: torch.optim.Adadelta
  // checks them in __init__ only (as FusedAdadelta does), and steps with
  // whatever a param_groups edit or an LRScheduler sets (a negative lr, say).
  check_scalar_tensor(options.lr_tensor, "lr", device, /*integers_allowed=*/true);
  check_scalar_tensor(options.grad_scale, "grad_scale", device, false);
  check_scalar_tensor(options.found_inf, "found_inf", device, false);
  const bool any_float32_compute = std::any_of(
      params.begin(), params.end(),
      [](const at::Tensor& param) { return computes_in_float32(param.scalar_type()); });
  if (any_float32_compute) {
    if (!options.lr_tensor.has_value()) {
      check_fits_float32(options.lr, "lr");
    }
    check_fits_float32(options.eps, "eps");
    check_fits_float32(options.weight_decay, "weight_decay");
  }
}

// ---------------------------------------------------------------------------
// Memory shared between tensors. Each tensor is reduced to the byte range from
// its first to one past its last element; ranges that intersect are taken to
// share memory (conservative for interleaved views, exact for everything else).

enum class Role : uint8_t { kParam, kGrad, kSquareAvg, kAccDelta, kStep, kCompensation };
constexpr size_t kRoles = 6;

const char* role_name(Role role) {
  switch (role) {
    case Role::kParam:
      return "params";
    case Role::kGrad:
      return "grads";
    case Role::kSquareAvg:
      return "square_avgs";
    case Role::kAccDelta:
      return "acc_deltas";
    case Role::kStep:
      return "state_steps";
    case Role::kCompensation:
      return "compensations";
  }
  return "?";
}

struct MemoryRange {
  uintptr_t begin;
  uintptr_t end;
  uint32_t index;
  Role role;

  bool operator==(const MemoryRange& other) const {
    return begin == other.begin && end == other.end && index == other.index && role == other.role;
  }
};

void add_range(
    std::vector<MemoryRange>& ranges,
    const at::Tensor& tensor,
    const void* data,
    Role role,
    size_t index) {
  const int64_t numel = tensor.numel();
  if (numel == 0) {
    return;
  }
  int64_t last = numel - 1;  // offset of the last element, in elements
  if (!tensor.is_contiguous()) {
    const at::IntArrayRef sizes = tensor.sizes();
    const at::IntArrayRef strides = tensor.strides();
    last = 0;
    for (size_t dim = 0; dim < sizes.size(); ++dim) {
      last += (sizes[dim] - 1) * strides[dim];
    }
  }
  const auto begin = reinterpret_cast<uintptr_t>(data);
  ranges.push_back(
      {begin, begin + static_cast<uintptr_t>((last + 1) * tensor.element_size()),
       static_cast<uint32_t>(index), role});
}

void check_no_internal_overlap(const at::Tensor& tensor, Role role, size_t index) {
  TORCH_CHECK(
      tensor.is_non_overlapping_and_dense() ||
          at::has_internal_overlap(tensor) != at::MemOverlap::Yes,
      "fused_adadelta_: ", role_name(role), "[", index,
      "] is written but has elements that share memory (an expanded tensor?): "
      "unsupported operation: more than one element of the written-to tensor refers "
      "to a single memory location. Please clone() the tensor before performing the "
      "operation.");
}

// What the shared-memory check found that the call must act on (see CheckedCall).
struct SharedMemory {
  bool params_overlap = false;
  std::vector<uint32_t> copied_grads;
  bool entries_repeat = false;  // see NOTE [Repeated entries]
};

// One tensor: the same TensorImpl, or the same data, sizes, strides and dtype.
bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.is_same(b) ||
      (a.const_data_ptr() == b.const_data_ptr() && a.scalar_type() == b.scalar_type() &&
       a.sizes() == b.sizes() && a.strides() == b.strides());
}

// NOTE [Repeated entries]
// A param listed twice in a group (tied weights gathered from two modules'
// parameters()) comes with its grad and state twice: torch.optim.Adadelta
// warns, and its for-loop updates the param twice in the step, the second
// time from the first's results (the step counter goes up by two). Entries
// i < j that are one param with one grad and state (same_tensor in every
// list) are stepped so, one after the other, as params that overlap are;
// entries that share some of those tensors and not all are refused. With
// grad_scale the grad would be unscaled twice: refused too.
bool entries_repeat(const FusedAdadeltaTensors& tensors, size_t i, size_t j) {
  for (const at::TensorList list :
       {tensors.params, tensors.grads, tensors.square_avgs, tensors.acc_deltas, tensors.state_steps}) {
    if (!same_tensor(list[i], list[j])) {
      return false;
    }
  }
  return !tensors.compensations.has_value() ||
      same_tensor((*tensors.compensations)[i], (*tensors.compensations)[j]);
}

// Raises if two tensors that must not share memory do. `ranges` is sorted by begin.
SharedMemory check_sorted_ranges(
    const std::vector<MemoryRange>& ranges,
    const FusedAdadeltaTensors& tensors,
    bool grads_are_written) {
  SharedMemory found;
  for (size_t a = 0; a < ranges.size(); ++a) {
    for (size_t b = a + 1; b < ranges.size() && ranges[b].begin < ranges[a].end; ++b) {
      const Role first = ranges[a].role;
      const Role second = ranges[b].role;
      const size_t i = std::min(ranges[a].index, ranges[b].index);
      const size_t j = std::max(ranges[a].index, ranges[b].index);
      if (first == second && ranges[a].begin == ranges[b].begin && ranges[a].end == ranges[b].end &&
          entries_repeat(tensors, i, j)) {
        TORCH_CHECK(
            !grads_are_written, "fused_adadelta_: params[", i, "] and params[", j,
            "] are one param with one grad and state (a param listed twice): grad_scale "
            "would unscale its grad twice");
        found.params_overlap = true;
        found.entries_repeat = true;
        continue;
      }
      if (first == Role::kParam && second == Role::kParam) {
        found.params_overlap = true;
        continue;
      }
      // Read-only grads may alias each other; steps are counters two params may share.
      const bool shareable = first == second &&
          (first == Role::kStep || (first == Role::kGrad && !grads_are_written));
      if (shareable) {
        continue;
      }
      // A read-only grad and a written tensor: see NOTE [Grads read through a copy].
      if (!grads_are_written && (first == Role::kGrad || second == Role::kGrad)) {
        found.copied_grads.push_back(first == Role::kGrad ? ranges[a].index : ranges[b].index);
        continue;
      }
      TORCH_CHECK(
          false, "fused_adadelta_: ", role_name(first), "[", ranges[a].index, "] and ",
          role_name(second), "[", ranges[b].index,
          "] share memory; each param's grad and state must be tensors of their own");
    }
  }
  std::sort(found.copied_grads.begin(), found.copied_grads.end());
  const auto duplicates = std::unique(found.copied_grads.begin(), found.copied_grads.end());
  found.copied_grads.erase(duplicates, found.copied_grads.end());
  return found;
}

// The byte ranges of one call's tensors, role by role (in Role's order), each
// role's in list order.
using RangesByRole = std::array<std::vector<MemoryRange>, kRoles>;

// NOTE [Shared-memory checks, remembered]
// A training loop calls the op on the same tensors at the same addresses step
// after step: params and state never move, and grads mostly come back where
// they were. Sorting thousands of ranges every step was most of the op's host
// cost for small params, so each thread remembers the ranges and outcome of
// its last few passing calls (whether params overlap, which grads are read
// through copies: both follow from the ranges alone), and an identical call
// repeats the outcome. Any difference (a grad elsewhere, another tensor)
// checks anew. A call with repeated entries (NOTE [Repeated entries]) is not
// remembered: whether entries repeat follows from more than their ranges (a
// square param and its transpose have one range).
struct PassedCheck {
  RangesByRole ranges;
  bool grads_are_written;
  SharedMemory found;
};
constexpr size_t kPassedChecksKept = 4;  // several param groups or devices per step

// Raises if two tensors that must not share memory do.
SharedMemory check_shared_memory(
    const RangesByRole& ranges,
    const FusedAdadeltaTensors& tensors,
    bool grads_are_written) {
  thread_local std::array<PassedCheck, kPassedChecksKept> passed;
  thread_local size_t next_replaced = 0;
  for (const PassedCheck& check : passed) {
    if (check.grads_are_written == grads_are_written && check.ranges == ranges) {
      return check.found;
    }
  }
  // Each list is often allocated in order (or, as autograd makes grads, in
  // reverse), so each role's run is often sorted already: sorting only the
  // runs that are not, then merging them, costs O(n) rather than O(n log n).
  const auto by_begin = [](const MemoryRange& a, const MemoryRange& b) { return a.begin < b.begin; };
  const auto by_begin_descending = [](const MemoryRange& a, const MemoryRange& b) {
    return a.begin > b.begin;
  };
  std::vector<MemoryRange> sorted;
  for (const std::vector<MemoryRange>& role_ranges : ranges) {
    const auto run_begin = static_cast<std::ptrdiff_t>(sorted.size());
    sorted.insert(sorted.end(), role_ranges.begin(), role_ranges.end());
    const auto run = sorted.begin() + run_begin;
    if (std::is_sorted(run, sorted.end(), by_begin_descending)) {
      std::reverse(run, sorted.end());
    } else if (!std::is_sorted(run, sorted.end(), by_begin)) {
      std::sort(run, sorted.end(), by_begin);
    }
    std::inplace_merge(sorted.begin(), run, sorted.end(), by_begin);
  }
  SharedMemory found = check_sorted_ranges(sorted, tensors, grads_are_written);
  if (!found.entries_repeat) {
    passed[next_replaced] = {ranges, grads_are_written, found};
    next_replaced = (next_replaced + 1) % kPassedChecksKept;
  }
  return found;
}

// Two dense tensors of one shape have their elements in the same order in
// memory when their strides agree on every dimension longer than one.
bool shares_dense_layout(const at::Tensor& param, const at::Tensor& other) {
  for (int64_t dim = 0; dim < param.dim(); ++dim) {
    if (param.size(dim) > 1 && param.stride(dim) != other.stride(dim)) {
      return false;
    }
  }
  return other.is_non_overlapping_and_dense();
}

// A Kahan compensation buffer: the param's shape, dtype and device, written.
void check_compensation(const at::Tensor& compensation, const at::Tensor& param, size_t index) {
  check_companion(compensation, param, "compensations", index);
  TORCH_CHECK(
      is_reduced_float(param.scalar_type()), "fused_adadelta_: params[", index, "] has dtype ",
      param.scalar_type(), "; Kahan summation is for float16 and bfloat16 params");
  TORCH_CHECK(
      compensation.scalar_type() == param.scalar_type(), "fused_adadelta_: compensations[",
      index, "] has dtype ", compensation.scalar_type(), " but params[", index,
      "] has dtype ", param.scalar_type(), "; a compensation has its param's dtype");
  check_writable(compensation, "compensations", index);
  check_no_internal_overlap(compensation, Role::kCompensation, index);
}

} // namespace

AdadeltaHyperparams<double> adadelta_hyperparams(const FusedAdadeltaOptions& options, double lr) {
  return AdadeltaHyperparams<double>{
      lr,
      options.rho,
      1.0 - options.rho,
      options.eps,
      options.weight_decay,
      options.maximize,
      options.weight_decay != 0,
      1.0 - options.rho == 1.0,
      options.lr_tensor.has_value() && options.round_lr_product};
}

// NOTE [Checks list by list]
// The checks read every tensor's metadata, and, for thousands of small params,
// a step's kernel has evicted it from the caches since the last step. They go
// through the lists one at a time (params, then grads, ...): reading the five
// tensors of each param in turn, each from a region of memory of its own, took
// twice as long cold (1,000 params of 4,096 elements: 1.0 ms against 0.56,
// benchmarks/NOTES.md entry 12). The same pass records what the kernel needs
// (CheckedCall::flat_params), so that the CPU op reads no tensor again. A call
// with several problems reports the first in list order.
CheckedCall check_fused_adadelta_call(
    const FusedAdadeltaTensors& tensors,
    const FusedAdadeltaOptions& options,
    bool record_flat_params) {
  const auto& [params, grads, square_avgs, acc_deltas, state_steps, compensations, seeds, _] = tensors;
  TORCH_CHECK(
      grads.size() == params.size() && square_avgs.size() == params.size() &&
          acc_deltas.size() == params.size() && state_steps.size() == params.size(),
      "fused_adadelta_: params, grads, square_avgs, acc_deltas and state_steps must have "
      "the same length, got ",
      params.size(), ", ", grads.size(), ", ", square_avgs.size(), ", ",
      acc_deltas.size(), " and ", state_steps.size());
  TORCH_CHECK(
      !compensations.has_value() || compensations->size() == params.size(),
      "fused_adadelta_: compensations must have one entry per param, got ",
      compensations.has_value() ? compensations->size() : 0, " for ", params.size(), " params");
  TORCH_CHECK(
      !seeds.has_value() || seeds->size() == params.size(),
      "fused_adadelta_: stochastic_round_seeds must have one entry per param, got ",
      seeds.has_value() ? seeds->size() : 0, " for ", params.size(), " params");
  TORCH_CHECK(
      !compensations.has_value() || !seeds.has_value(),
      "fused_adadelta_: compensations (Kahan summation) and stochastic_round_seeds "
      "(stochastic rounding) exclude each other");
  CheckedCall call{false, false, {}, {}};
  if (params.empty()) {
    return call;
  }
  const size_t count = params.size();
  const at::Device device = params[0].device();
  const bool grads_are_written = options.grad_scale.has_value();
  const bool has_addresses = !device.is_meta();
  thread_local RangesByRole ranges;
  for (std::vector<MemoryRange>& role_ranges : ranges) {
    role_ranges.clear();
  }
  // The records, for a caller that runs its kernel from them (see kRunsFromFlatParams); a
  // caller that does not gets none, and no access to any tensor's data for writing.
  const bool record = record_flat_params && has_addresses;
  std::vector<FlatParam>& flat = call.flat_params;
  flat.resize(record ? count : 0);
  FlatParam discarded{};
  const auto record_of = [&](size_t i) -> FlatParam& { return record ? flat[i] : discarded; };
  bool all_flat = record;
  // Where the records are kept, a written tensor's data is read as the kernel
  // will write it (a copy-on-write tensor gets its own copy, with the same
  // values; a tensor that must not be written raises), so that its range is the
  // memory the kernel writes.
  const auto data_of = [&](const at::Tensor& tensor, bool written, Role role, size_t i) -> void* {
    if (!has_addresses) {
      return nullptr;
    }
    void* data = written && record ? tensor.mutable_data_ptr() : const_cast<void*>(tensor.const_data_ptr());
    add_range(ranges[static_cast<size_t>(role)], tensor, data, role, i);
    return data;
  };
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(
        param.defined() && param.layout() == at::kStrided, "fused_adadelta_: params[", i,
        "] must be a defined dense tensor");
    TORCH_CHECK(
        param.device() == device, "fused_adadelta_: params[", i, "] is on ", param.device(),
        " but params[0] is on ", device, "; one call updates tensors of one device");
    const at::ScalarType dtype = param.scalar_type();
    TORCH_CHECK(
        is_supported_param_dtype(dtype), "fused_adadelta_: params[", i, "] has dtype ",
        dtype, "; supported are float32, float64, float16, bfloat16, complex64 and complex128");
    TORCH_CHECK(
        !seeds.has_value() || is_reduced_float(dtype), "fused_adadelta_: params[", i,
        "] has dtype ", dtype, "; stochastic rounding is for float16 and bfloat16 params");
    check_writable(param, "params", i);
    // From strides alone, so on meta too.
    check_no_internal_overlap(param, Role::kParam, i);
    call.any_complex = call.any_complex || param.is_complex();
    all_flat = all_flat && param.is_non_overlapping_and_dense();
    record_of(i).param = data_of(param, true, Role::kParam, i);
    record_of(i).numel = record ? param.numel() : 0;  // sizes may be symbolic on meta
    record_of(i).param_dtype = dtype;
  }
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& grad = grads[i];
    check_companion(grad, params[i], "grads", i);
    // A float32 grad is read as float32 in the kernel (torch's grad_dtype, e.g.
    // bfloat16 weights with float32 grads).
    const at::ScalarType dtype = params[i].scalar_type();
    TORCH_CHECK(
        grad.scalar_type() == dtype || (grad.scalar_type() == at::kFloat && !at::isComplexType(dtype)),
        "fused_adadelta_: grads[", i, "] has dtype ", grad.scalar_type(), " but params[", i,
        "] has dtype ", dtype, "; a grad must have its param's dtype",
        at::isComplexType(dtype) ? "" : " or float32");
    if (grads_are_written) {
      check_writable(grad, "grads", i);
      check_no_internal_overlap(grad, Role::kGrad, i);
    }
    all_flat = all_flat && shares_dense_layout(params[i], grad);
    record_of(i).grad = data_of(grad, grads_are_written, Role::kGrad, i);
    record_of(i).grad_dtype = grad.scalar_type();
  }
  for (const auto& [list, role] :
       {std::pair{square_avgs, Role::kSquareAvg}, std::pair{acc_deltas, Role::kAccDelta}}) {
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor& state = list[i];
      check_companion(state, params[i], role_name(role), i);
      if (role == Role::kAccDelta) {
        check_state_dtypes(params[i], square_avgs[i], state, i);
      }
      check_writable(state, role_name(role), i);
      check_no_internal_overlap(state, role, i);
      all_flat = all_flat && shares_dense_layout(params[i], state);
      void* data = data_of(state, true, role, i);
      if (role == Role::kSquareAvg) {
        record_of(i).square_avg = data;
        record_of(i).state_dtype = state.scalar_type();
      } else {
        record_of(i).acc_delta = data;
      }
    }
  }
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(
        step.defined() && step.numel() == 1 &&
            (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble) &&
            step.device() == device,
        "fused_adadelta_: state_steps[", i,
        "] must be a one-element float32 or float64 tensor on ", device);
    check_writable(step, "state_steps", i);
    record_of(i).step = data_of(step, true, Role::kStep, i);
    record_of(i).step_dtype = step.scalar_type();
  }
  for (size_t i = 0; compensations.has_value() && i < count; ++i) {
    const at::Tensor& compensation = (*compensations)[i];
    check_compensation(compensation, params[i], i);
    all_flat = all_flat && shares_dense_layout(params[i], compensation);
    record_of(i).compensation = data_of(compensation, true, Role::kCompensation, i);
  }
  check_options(params, device, options);
  if (has_addresses) {
    SharedMemory found = check_shared_memory(ranges, tensors, grads_are_written);
    call.params_overlap = found.params_overlap;
    call.copied_grads = std::move(found.copied_grads);
  }
  if (!all_flat || call.any_complex) {
    flat.clear();
  }
  return call;
}

RealTensors::RealTensors(const FusedAdadeltaTensors& tensors_in, bool any_complex)
    : tensors(tensors_in) {
  if (!any_complex) {
    return;
  }
  at::TensorList* lists[4] = {
      &tensors.params, &tensors.grads, &tensors.square_avgs, &tensors.acc_deltas};
  for (int list = 0; list < 4; ++list) {
    for (const at::Tensor& tensor : *lists[list]) {
      views_[list].push_back(tensor.is_complex() ? at::view_as_real(tensor) : tensor);
    }
    *lists[list] = views_[list];
  }
}

GradCopies::GradCopies(const FusedAdadeltaTensors& tensors_in, CheckedCall& call)
    : tensors(tensors_in) {
  if (call.copied_grads.empty()) {
    return;
  }
  grads_ = tensors.grads.vec();
  for (const uint32_t i : call.copied_grads) {
    // A dense grad keeps its strides, so that a param's flat record still fits.
    grads_[i] = grads_[i].clone(at::MemoryFormat::Preserve);
    if (!call.flat_params.empty()) {
      call.flat_params[i].grad = grads_[i].mutable_data_ptr();
    }
  }
  tensors.grads = grads_;
}

FusedAdadeltaTensors FusedAdadeltaTensors::entry(size_t i) const {
  FusedAdadeltaTensors one{params[i], grads[i], square_avgs[i], acc_deltas[i], state_steps[i]};
  if (compensations.has_value()) {
    one.compensations = compensations->slice(i, 1);
  }
  if (stochastic_round_seeds.has_value()) {
    one.stochastic_round_seeds = stochastic_round_seeds->slice(i, 1);
  }
  return one;
}

FlatTensorLists::FlatTensorLists(const FusedAdadeltaTensors& tensors, bool grads_are_written)
    : params(tensors.params),
      grads(tensors.grads),
      square_avgs(tensors.square_avgs),
      acc_deltas(tensors.acc_deltas),
      compensations(tensors.compensations.value_or(at::TensorList())),
      original_(tensors),
      grads_are_written_(grads_are_written) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const bool has_compensation = !compensations.empty();
    const bool all_contiguous = param.is_contiguous() && grads[i].is_contiguous() &&
        square_avgs[i].is_contiguous() && acc_deltas[i].is_contiguous() &&
        (!has_compensation || compensations[i].is_contiguous());
    const bool flat = all_contiguous ||
        (param.is_non_overlapping_and_dense() && shares_dense_layout(param, grads[i]) &&
         shares_dense_layout(param, square_avgs[i]) && shares_dense_layout(param, acc_deltas[i]) &&
         (!has_compensation || shares_dense_layout(param, compensations[i])));
    if (!flat) {
      copied_.push_back(i);
    }
  }
  if (copied_.empty()) {
    return;
  }
  at::TensorList* lists[5] = {&params, &grads, &square_avgs, &acc_deltas, &compensations};
  for (int list = 0; list < 5; ++list) {
    if (lists[list]->empty()) {
      continue;  // no compensations
    }
    lists_with_copies_[list] = lists[list]->vec();
    for (const size_t i : copied_) {
      lists_with_copies_[list][i] = lists_with_copies_[list][i].contiguous();
    }
    *lists[list] = lists_with_copies_[list];
  }
}

std::vector<FlatParam> FlatTensorLists::flat_params(at::TensorList state_steps) const {
  std::vector<FlatParam> flat(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    flat[i] = FlatParam{
        params[i].mutable_data_ptr(),
        grads[i].mutable_data_ptr(),
        square_avgs[i].mutable_data_ptr(),
        acc_deltas[i].mutable_data_ptr(),
        compensations.empty() ? nullptr : compensations[i].mutable_data_ptr(),
        state_steps[i].mutable_data_ptr(),
        params[i].numel(),
        params[i].scalar_type(),
        grads[i].scalar_type(),
        square_avgs[i].scalar_type(),
        state_steps[i].scalar_type()};
  }
  return flat;
}

void FlatTensorLists::write_back() const {
  for (const size_t i : copied_) {
    const auto copy_if_needed = [](const at::Tensor& original, const at::Tensor& flat) {
      if (!original.is_same(flat)) {
        original.copy_(flat);
      }
    };
    copy_if_needed(original_.params[i], params[i]);
    copy_if_needed(original_.square_avgs[i], square_avgs[i]);
    copy_if_needed(original_.acc_deltas[i], acc_deltas[i]);
    if (!compensations.empty()) {
      copy_if_needed((*original_.compensations)[i], compensations[i]);
    }
    if (grads_are_written_) {
      copy_if_needed(original_.grads[i], grads[i]);
    }
  }
}

} // namespace adadelta_ext
