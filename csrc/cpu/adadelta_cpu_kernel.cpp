// The CPU kernel. setup.py compiles this file once per instruction set, with
// -DCPU_CAPABILITY=<set> and that set's compiler flags (-mavx2, -mavx512f, ...),
// and fused_adadelta_cpu.cpp picks one at run time, as ATen does.
//
// Only at::vec (whose code lives in a namespace named by CPU_CAPABILITY) is
// used here, so no plain c10 inline function compiled with AVX-512 flags can
// be shared with, and crash, the other builds. For the same reason the tail
// of each range goes through masked vector loads and stores rather than
// scalar c10::Half/BFloat16 conversions.
#include "adadelta_cpu_kernel.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

namespace adadelta_ext::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
constexpr bool is_reduced_float =
    std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// float16/bfloat16 compute in float32; float32 and float64 in themselves.
template <typename scalar_t>
using opmath_t = std::conditional_t<is_reduced_float<scalar_t>, float, scalar_t>;

// Loads and stores `kParts` opmath vectors' worth of elements of `storage_t`.
template <typename storage_t, typename opmath, int kParts>
struct BlockIO {
  using OpVec = Vectorized<opmath>;
  static constexpr int64_t kLanes = OpVec::size();

  static void load(const storage_t* ptr, int64_t count, OpVec (&out)[kParts]) {
    if constexpr (is_reduced_float<storage_t>) {
      static_assert(kParts == 2 && Vectorized<storage_t>::size() == 2 * kLanes);
      const auto packed = Vectorized<storage_t>::loadu(ptr, count);
      std::tie(out[0], out[1]) = at::vec::convert_to_float<storage_t>(packed);
    } else {
      for (int part = 0; part < kParts; ++part) {
        const int64_t part_count =
            std::clamp<int64_t>(count - part * kLanes, 0, kLanes);
        out[part] = part_count == 0
            ? OpVec(opmath(0))
            : OpVec::loadu(ptr + part * kLanes, part_count);
      }
    }
  }

  static void store(storage_t* ptr, int64_t count, const OpVec (&in)[kParts]) {
    if constexpr (is_reduced_float<storage_t>) {
      at::vec::convert_from_float<storage_t>(in[0], in[1]).store(ptr, count);
    } else {
      for (int part = 0; part < kParts; ++part) {
        const int64_t part_count =
            std::clamp<int64_t>(count - part * kLanes, 0, kLanes);
        if (part_count > 0) {
          in[part].store(ptr + part * kLanes, part_count);
        }
      }
    }
  }
};

template <typename param_t, typename state_t>
void update_range(
    const FlatTensorPointers& tensors,
    int64_t begin,
    int64_t end,
    const CpuStepArguments& arguments) {
  using opmath = opmath_t<param_t>;
  using OpVec = Vectorized<opmath>;
  // A reduced-precision vector converts to two float vectors.
  constexpr int kParts = is_reduced_float<param_t> ? 2 : 1;
  constexpr int64_t kBlock = kParts * OpVec::size();
  using ParamIO = BlockIO<param_t, opmath, kParts>;
  using StateIO = BlockIO<state_t, opmath, kParts>;

  const AdadeltaHyperparams<double>& h = arguments.hyper;
  const AdadeltaHyperparams<OpVec> hyper{
      OpVec(opmath(h.lr)),
      OpVec(opmath(h.rho)),
      OpVec(opmath(h.one_minus_rho)),
      OpVec(opmath(h.eps)),
      OpVec(opmath(h.weight_decay)),
      h.maximize,
      h.use_weight_decay};
  const OpVec grad_scale(opmath(arguments.grad_scale));

  auto* const param = static_cast<param_t*>(tensors.param);
  auto* const grad = static_cast<param_t*>(tensors.grad);
  auto* const square_avg = static_cast<state_t*>(tensors.square_avg);
  auto* const acc_delta = static_cast<state_t*>(tensors.acc_delta);

  const auto update_block = [&](int64_t offset, int64_t count) {
    OpVec param_vec[kParts], grad_vec[kParts], square_avg_vec[kParts],
        acc_delta_vec[kParts];
    ParamIO::load(param + offset, count, param_vec);
    ParamIO::load(grad + offset, count, grad_vec);
    StateIO::load(square_avg + offset, count, square_avg_vec);
    StateIO::load(acc_delta + offset, count, acc_delta_vec);
    if (arguments.unscale_grad) {
      for (int part = 0; part < kParts; ++part) {
        grad_vec[part] = grad_vec[part] / grad_scale;
      }
      ParamIO::store(grad + offset, count, grad_vec);
    }
    for (int part = 0; part < kParts; ++part) {
      adadelta_update(
          param_vec[part], grad_vec[part], square_avg_vec[part],
          acc_delta_vec[part], hyper);
    }
    ParamIO::store(param + offset, count, param_vec);
    StateIO::store(square_avg + offset, count, square_avg_vec);
    StateIO::store(acc_delta + offset, count, acc_delta_vec);
  };

  int64_t offset = begin;
  for (; offset + kBlock <= end; offset += kBlock) {
    update_block(offset, kBlock);
  }
  if (offset < end) {
    update_block(offset, end - offset);
  }
}

} // namespace

UpdateRangeFn update_range_for(
    c10::ScalarType param_dtype,
    c10::ScalarType state_dtype) {
  const bool fp32_state = state_dtype == c10::ScalarType::Float;
  switch (param_dtype) {
    case c10::ScalarType::Float:
      return &update_range<float, float>;
    case c10::ScalarType::Double:
      return &update_range<double, double>;
    case c10::ScalarType::Half:
      return fp32_state ? &update_range<c10::Half, float>
                        : &update_range<c10::Half, c10::Half>;
    case c10::ScalarType::BFloat16:
      return fp32_state ? &update_range<c10::BFloat16, float>
                        : &update_range<c10::BFloat16, c10::BFloat16>;
    default:
      return nullptr;
  }
}

} // namespace CPU_CAPABILITY
} // namespace adadelta_ext::cpu
