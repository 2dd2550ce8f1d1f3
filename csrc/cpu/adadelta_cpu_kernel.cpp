// The CPU kernel. setup.py compiles this file once per instruction set, with
// -DCPU_CAPABILITY=<set> and that set's compiler flags (-mavx2, -mavx512f, ...);
// each build registers itself, and fused_adadelta_cpu.cpp picks one at run
// time, as ATen does.
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
#include <cmath>
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
  static constexpr int64_t kBlock = kParts * kLanes;

  static void load(const storage_t* ptr, int64_t count, OpVec (&out)[kParts]) {
    if constexpr (std::is_same_v<storage_t, opmath>) {
      for (int part = 0; part < kParts; ++part) {
        const int64_t part_count = std::clamp<int64_t>(count - part * kLanes, 0, kLanes);
        out[part] = part_count == 0 ? OpVec(opmath(0))
                                    : OpVec::loadu(ptr + part * kLanes, part_count);
      }
    } else if constexpr (is_reduced_float<storage_t>) {
      static_assert(kParts == 2 && Vectorized<storage_t>::size() == kBlock);
      const auto packed = Vectorized<storage_t>::loadu(ptr, count);
      std::tie(out[0], out[1]) = at::vec::convert_to_float<storage_t>(packed);
    } else {
      // float32 grads of a float64 param: a built-in conversion per element.
      opmath values[kBlock] = {};
      for (int64_t i = 0; i < count; ++i) {
        values[i] = static_cast<opmath>(ptr[i]);
      }
      for (int part = 0; part < kParts; ++part) {
        out[part] = OpVec::loadu(values + part * kLanes);
      }
    }
  }

  static void store(storage_t* ptr, int64_t count, const OpVec (&in)[kParts]) {
    if constexpr (std::is_same_v<storage_t, opmath>) {
      for (int part = 0; part < kParts; ++part) {
        const int64_t part_count = std::clamp<int64_t>(count - part * kLanes, 0, kLanes);
        if (part_count > 0) {
          in[part].store(ptr + part * kLanes, part_count);
        }
      }
    } else if constexpr (is_reduced_float<storage_t>) {
      at::vec::convert_from_float<storage_t>(in[0], in[1]).store(ptr, count);
    } else {
      opmath values[kBlock];
      for (int part = 0; part < kParts; ++part) {
        in[part].store(values + part * kLanes);
      }
      for (int64_t i = 0; i < count; ++i) {
        ptr[i] = static_cast<storage_t>(values[i]);
      }
    }
  }
};

// Correctly rounded operations on vectors, one rounding each (see NOTE [One
// rounding per op, written out] in adadelta_math.h); -ffp-contract=off keeps
// the compiler from fusing a product into a sum.
template <typename opmath>
struct VectorRounding {
  using OpVec = Vectorized<opmath>;
  static OpVec mul(const OpVec& a, const OpVec& b) {
    return a * b;
  }
  static OpVec add(const OpVec& a, const OpVec& b) {
    return a + b;
  }
  static OpVec sub(const OpVec& a, const OpVec& b) {
    return a - b;
  }
  static OpVec div(const OpVec& a, const OpVec& b) {
    return a / b;
  }
  static OpVec sqrt(const OpVec& a) {
    return a.sqrt();
  }
  static OpVec fma(const OpVec& a, const OpVec& b, const OpVec& c) {
#if defined(CPU_CAPABILITY_DEFAULT)
    // DEFAULT's at::vec::fmadd is a * b + c, two roundings: std::fma per lane
    // (glibc runs the FMA instruction where the CPU has one).
    opmath a_lanes[OpVec::size()], b_lanes[OpVec::size()], c_lanes[OpVec::size()];
    a.store(a_lanes);
    b.store(b_lanes);
    c.store(c_lanes);
    for (int64_t i = 0; i < OpVec::size(); ++i) {
      a_lanes[i] = std::fma(a_lanes[i], b_lanes[i], c_lanes[i]);
    }
    return OpVec::loadu(a_lanes);
#else
    // One FMA instruction (_mm256_fmadd_ps, _mm512_fmadd_pd, ...).
    return at::vec::fmadd(a, b, c);
#endif
  }
};

// A float vector rounded to nearest even in param_t, back as floats: the
// param as the store will round it.
template <typename param_t>
Vectorized<float> round_to(const Vectorized<float>& values) {
  return std::get<0>(at::vec::convert_to_float<param_t>(at::vec::convert_from_float<param_t>(values, values)));
}

// The block's param values rounded stochastically (NOTE [Stochastic rounding]),
// element offset + j taking the bits of index offset + j.
template <typename param_t, int kParts>
void stochastic_round(Vectorized<float> (&values)[kParts], int64_t offset, uint64_t key) {
  constexpr int64_t kLanes = Vectorized<float>::size();
  float lanes[kParts * kLanes];
  for (int part = 0; part < kParts; ++part) {
    values[part].store(lanes + part * kLanes);
  }
  for (int64_t j = 0; j < kParts * kLanes; ++j) {
    const uint32_t random = stochastic_round_bits(key, static_cast<uint64_t>(offset + j));
    lanes[j] = std::is_same_v<param_t, c10::BFloat16> ? stochastic_round_to_bfloat16(lanes[j], random)
                                                      : stochastic_round_to_float16(lanes[j], random);
  }
  for (int part = 0; part < kParts; ++part) {
    values[part] = Vectorized<float>::loadu(lanes + part * kLanes);
  }
}

template <typename param_t, typename grad_t, typename state_t, ParamRounding kRounding>
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
  using GradIO = BlockIO<grad_t, opmath, kParts>;
  using StateIO = BlockIO<state_t, opmath, kParts>;
  static_assert(kRounding == ParamRounding::kNearest || is_reduced_float<param_t>);

  const auto hyper = hyperparams_as<OpVec, opmath>(arguments.hyper);
  const OpVec inverse_grad_scale(opmath(arguments.inverse_grad_scale));

  auto* const param = static_cast<param_t*>(tensors.param);
  auto* const grad = static_cast<grad_t*>(tensors.grad);
  auto* const square_avg = static_cast<state_t*>(tensors.square_avg);
  auto* const acc_delta = static_cast<state_t*>(tensors.acc_delta);
  auto* const compensation = static_cast<param_t*>(tensors.compensation);

  const auto update_block = [&](int64_t offset, int64_t count) {
    OpVec param_vec[kParts], grad_vec[kParts], square_avg_vec[kParts],
        acc_delta_vec[kParts];
    ParamIO::load(param + offset, count, param_vec);
    GradIO::load(grad + offset, count, grad_vec);
    StateIO::load(square_avg + offset, count, square_avg_vec);
    StateIO::load(acc_delta + offset, count, acc_delta_vec);
    if (arguments.unscale_grad) {
      for (int part = 0; part < kParts; ++part) {
        grad_vec[part] = grad_vec[part] * inverse_grad_scale;
      }
      GradIO::store(grad + offset, count, grad_vec);
      if constexpr (!std::is_same_v<grad_t, opmath>) {
        // The step uses the grad rounded to its dtype, as stored.
        GradIO::load(grad + offset, count, grad_vec);
      }
    }
    if constexpr (kRounding == ParamRounding::kKahan) {
      OpVec compensation_vec[kParts];
      ParamIO::load(compensation + offset, count, compensation_vec);
      for (int part = 0; part < kParts; ++part) {
        adadelta_update_kahan<VectorRounding<opmath>>(
            param_vec[part], compensation_vec[part], grad_vec[part], square_avg_vec[part],
            acc_delta_vec[part], hyper, &round_to<param_t>);
      }
      ParamIO::store(compensation + offset, count, compensation_vec);
    } else {
      for (int part = 0; part < kParts; ++part) {
        adadelta_update<VectorRounding<opmath>>(
            param_vec[part], grad_vec[part], square_avg_vec[part],
            acc_delta_vec[part], hyper);
      }
      if constexpr (kRounding == ParamRounding::kStochastic) {
        stochastic_round<param_t>(param_vec, offset, tensors.stochastic_round_key);
      }
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

// Every (param, grad, state) dtype triple the op accepts (see
// check_fused_adadelta_call): grads of the param's dtype or float32; state of
// the param's dtype, or float32 for float16/bfloat16; float16/bfloat16 params
// with each rounding.
UpdateRangeFn find_update_range_in_this_build(const KernelDtypes& dtypes) {
  using c10::BFloat16;
  using c10::Half;
  using c10::ScalarType;
  struct Instance {
    KernelDtypes dtypes;
    UpdateRangeFn update_range;
  };
  constexpr ParamRounding kNearest = ParamRounding::kNearest;
  // The float16/bfloat16 instances, with one rounding.
#define ADADELTA_REDUCED_FLOAT_INSTANCES(rounding)                                        \
  {{ScalarType::Half, ScalarType::Half, ScalarType::Half, rounding},                       \
   &update_range<Half, Half, Half, rounding>},                                             \
      {{ScalarType::Half, ScalarType::Half, ScalarType::Float, rounding},                  \
       &update_range<Half, Half, float, rounding>},                                        \
      {{ScalarType::Half, ScalarType::Float, ScalarType::Half, rounding},                  \
       &update_range<Half, float, Half, rounding>},                                        \
      {{ScalarType::Half, ScalarType::Float, ScalarType::Float, rounding},                 \
       &update_range<Half, float, float, rounding>},                                       \
      {{ScalarType::BFloat16, ScalarType::BFloat16, ScalarType::BFloat16, rounding},       \
       &update_range<BFloat16, BFloat16, BFloat16, rounding>},                             \
      {{ScalarType::BFloat16, ScalarType::BFloat16, ScalarType::Float, rounding},          \
       &update_range<BFloat16, BFloat16, float, rounding>},                                \
      {{ScalarType::BFloat16, ScalarType::Float, ScalarType::BFloat16, rounding},          \
       &update_range<BFloat16, float, BFloat16, rounding>},                                \
      {{ScalarType::BFloat16, ScalarType::Float, ScalarType::Float, rounding},             \
       &update_range<BFloat16, float, float, rounding>}
  static constexpr Instance kInstances[] = {
      {{ScalarType::Float, ScalarType::Float, ScalarType::Float, kNearest},
       &update_range<float, float, float, kNearest>},
      {{ScalarType::Double, ScalarType::Double, ScalarType::Double, kNearest},
       &update_range<double, double, double, kNearest>},
      {{ScalarType::Double, ScalarType::Float, ScalarType::Double, kNearest},
       &update_range<double, float, double, kNearest>},
      ADADELTA_REDUCED_FLOAT_INSTANCES(ParamRounding::kNearest),
      ADADELTA_REDUCED_FLOAT_INSTANCES(ParamRounding::kKahan),
      ADADELTA_REDUCED_FLOAT_INSTANCES(ParamRounding::kStochastic),
  };
#undef ADADELTA_REDUCED_FLOAT_INSTANCES
  for (const Instance& instance : kInstances) {
    if (instance.dtypes.param == dtypes.param && instance.dtypes.grad == dtypes.grad &&
        instance.dtypes.state == dtypes.state && instance.dtypes.rounding == dtypes.rounding) {
      return instance.update_range;
    }
  }
  return nullptr;
}

#define ADADELTA_STRINGIFY(name) #name
#define ADADELTA_NAME_OF(name) ADADELTA_STRINGIFY(name)
const bool registered = register_kernel_isa(
    ADADELTA_NAME_OF(CPU_CAPABILITY), ADADELTA_CPU_ISA_RANK, &find_update_range_in_this_build);

} // namespace CPU_CAPABILITY
} // namespace adadelta_ext::cpu
