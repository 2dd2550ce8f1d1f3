// The Adadelta update of one element (or one SIMD vector of elements).
//
// This header includes no torch header, so nvcc can compile the CUDA kernels
// alone (see csrc/cuda/adadelta_cuda_kernel.cuh) on a machine whose torch has
// no CUDA headers. The CPU kernel instantiates it with at::vec::Vectorized,
// the CUDA kernel with float or double: the math is written once, here.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

#if defined(__CUDACC__)
#define ADADELTA_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced, as for CUDA: GCC kept adadelta_update out of line, one call per
// vector, with the vectors passed through memory (benchmarks/NOTES.md, entry 11).
#define ADADELTA_HOST_DEVICE inline __attribute__((always_inline))
#else
#define ADADELTA_HOST_DEVICE inline
#endif

namespace adadelta_ext {

// Hyperparameters of one step, already in the arithmetic type T.
// one_minus_rho is computed once, in double, by the caller (as torch.optim
// computes `1 - rho` in Python), so every backend rounds it the same way.
template <typename T>
struct AdadeltaHyperparams {
  T lr;
  T rho;
  T one_minus_rho;
  T eps;
  T weight_decay;
  bool maximize;
  bool use_weight_decay;
  // one_minus_rho is exactly 1 in T: torch's addcmul then fuses g*g itself.
  bool unit_one_minus_rho;
  // lr came from a tensor under capturable: torch multiplies the update by
  // -lr and adds it, two roundings, where a number lr is one fused step.
  bool lr_product_rounded;
};

// NOTE [One rounding per op, written out]
// Every product, sum, quotient and square root below is one call to Ops, the
// backend's correctly rounded operations on T:
//   Ops::mul(a, b), Ops::add(a, b), Ops::div(a, b), Ops::sqrt(a)   one IEEE op;
//   Ops::fma(a, b, c)                                              a*b + c, rounded once.
// Written this way no compiler flag can fuse or split an op (nvcc contracts
// a*b + c into an FMA in some lanes of a vector and not in others), so the CPU
// and CUDA kernels give the same bits, and on CUDA those of torch.optim.Adadelta,
// whose foreach kernels compute, per element (ATen's ForeachFunctors.cuh):
//
//   g          = -grad if maximize else grad
//   g          = fma(weight_decay, param, g)                    (weight_decay != 0)
//   square_avg = fma(1 - rho, g * g, square_avg * rho)          addcmul(value = 1 - rho)
//              = fma(g, g, square_avg * rho)                    when 1 - rho == 1
//   update     = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
//   acc_delta  = fma(1 - rho, update * update, acc_delta * rho)
//   param      = fma(-lr, update, param)                        add(alpha = -lr)
//              = param + update * (-lr)                         capturable, tensor lr
// The hyperparameters in the arithmetic type T (a scalar or a SIMD vector of
// Scalar), each rounded once from its double value as torch rounds a Python
// float it is given.
template <typename T, typename Scalar = T>
ADADELTA_HOST_DEVICE AdadeltaHyperparams<T> hyperparams_as(const AdadeltaHyperparams<double>& h) {
  const Scalar one_minus_rho = static_cast<Scalar>(h.one_minus_rho);
  return AdadeltaHyperparams<T>{
      T(static_cast<Scalar>(h.lr)),
      T(static_cast<Scalar>(h.rho)),
      T(one_minus_rho),
      T(static_cast<Scalar>(h.eps)),
      T(static_cast<Scalar>(h.weight_decay)),
      h.maximize,
      h.use_weight_decay,
      one_minus_rho == Scalar(1),
      h.lr_product_rounded};
}

// torch's addcmul(self, value, value, 1 - rho), rounded as its CUDA kernel rounds.
template <typename Ops, typename T>
ADADELTA_HOST_DEVICE T rounded_addcmul(const AdadeltaHyperparams<T>& hyper, T self, T value) {
  return hyper.unit_one_minus_rho
      ? Ops::fma(value, value, self)
      : Ops::fma(hyper.one_minus_rho, Ops::mul(value, value), self);
}

// The state's update for one element, and the update the param takes
// (before lr): the whole step but its last line.
template <typename Ops, typename T>
ADADELTA_HOST_DEVICE T adadelta_state_update(
    const T& param,
    T grad,
    T& square_avg,
    T& acc_delta,
    const AdadeltaHyperparams<T>& hyper) {
  if (hyper.maximize) {
    grad = -grad;
  }
  if (hyper.use_weight_decay) {
    grad = Ops::fma(hyper.weight_decay, param, grad);
  }
  square_avg = rounded_addcmul<Ops>(hyper, Ops::mul(square_avg, hyper.rho), grad);
  const T std = Ops::sqrt(Ops::add(square_avg, hyper.eps));
  const T update =
      Ops::mul(Ops::div(Ops::sqrt(Ops::add(acc_delta, hyper.eps)), std), grad);
  acc_delta = rounded_addcmul<Ops>(hyper, Ops::mul(acc_delta, hyper.rho), update);
  return update;
}

template <typename Ops, typename T>
ADADELTA_HOST_DEVICE void adadelta_update(
    T& param,
    T grad,
    T& square_avg,
    T& acc_delta,
    const AdadeltaHyperparams<T>& hyper) {
  const T update = adadelta_state_update<Ops>(param, grad, square_avg, acc_delta, hyper);
  param = hyper.lr_product_rounded ? Ops::add(param, Ops::mul(update, -hyper.lr))
                                   : Ops::fma(-hyper.lr, update, param);
}

// ---------------------------------------------------------------------------
// Pure 16-bit training: how FusedAdadelta(kahan_sum=True) and
// (stochastic_round=True) turn a float32 result into a float16 or bfloat16
// param. With round-to-nearest, an update under half the spacing of the
// param's dtype around the param is lost, every step.

// How a float16/bfloat16 param takes its float32 result: rounded to nearest,
// as torch.optim.Adadelta does, with Kahan summation, or rounded
// stochastically. Other params round to nearest.
enum class ParamRounding : uint8_t { kNearest, kKahan, kStochastic };

// NOTE [Kahan summation]
// The param is stored rounded, and what the rounding lost is stored beside it,
// in a compensation buffer of the param's dtype, and added back into the next
// step's update (Kahan's compensated summation, in float32):
//   update       = update * (-lr)                 one rounding, as capturable's
//   compensated  = compensation + update
//   param'       = round(param + compensated)     to the param's dtype
//   compensation = compensated - (param' - param)
// param' - param is exact (two close values of the param's dtype), so the
// compensation holds what the param still owes, to its own dtype's precision.
// round_to_param rounds a float as the store will, returning a float.
template <typename Ops, typename T, typename RoundToParam>
ADADELTA_HOST_DEVICE void adadelta_update_kahan(
    T& param,
    T& compensation,
    T grad,
    T& square_avg,
    T& acc_delta,
    const AdadeltaHyperparams<T>& hyper,
    const RoundToParam& round_to_param) {
  const T update = adadelta_state_update<Ops>(param, grad, square_avg, acc_delta, hyper);
  const T compensated = Ops::add(compensation, Ops::mul(update, -hyper.lr));
  const T rounded = round_to_param(Ops::add(param, compensated));
  compensation = Ops::sub(compensated, Ops::sub(rounded, param));
  param = rounded;
}

// NOTE [Stochastic rounding]
// A float32 value x between the neighbours lo < x < hi of the param's dtype
// becomes hi with probability (x - lo) / (hi - lo), lo otherwise: its
// expected value is x, so small updates add up on average instead of
// vanishing. The random bits come from a counter-based hash of (seed, step,
// element index), nothing else: the same seed gives the same bits on any
// number of threads, on the CPU or CUDA, and a run resumed from a checkpoint
// (which saves the seed and the step) continues bit for bit.
//
// On float32's bit pattern, with the magnitude's k low bits below the dtype's
// spacing: add k random bits, then clear them; a carry moves the value to the
// next one up, into the next binade where it must. The store's
// round-to-nearest conversion is then exact. At the edges:
// - inf and NaN are left as they are (round-to-nearest keeps them);
// - a value the carry would take past the dtype's largest finite value is
//   left to the store's round-to-nearest: inf where that rounds to inf, the
//   largest finite value otherwise;
// - float16's subnormals have the fixed spacing 2^-24: k grows by one per
//   binade below 2^-14, and magnitudes under 2^-24 become 2^-24 or 0.
// bfloat16 has float32's exponent range: k is 16 everywhere, subnormals too.
//
// The functions below take and return plain integers and floats, so they are
// given internal linkage: each CPU instruction-set build of the kernel (see
// cpu/adadelta_cpu_kernel.h) keeps its own copy, compiled with its own flags.
namespace {

ADADELTA_HOST_DEVICE uint32_t bits_of(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

ADADELTA_HOST_DEVICE float float_of(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// splitmix64's finalizer: a bijection on 64-bit integers in which every
// output bit depends on every input bit.
ADADELTA_HOST_DEVICE uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

// One param's key for one step (`step`: the param's step count after it);
// every element's bits derive from the key and the element's index.
ADADELTA_HOST_DEVICE uint64_t stochastic_round_key(uint64_t seed, uint64_t step) {
  return mix64(seed ^ mix64(step));
}

// The step a param's key takes: its count after this step, from the count
// before it (a float32 or float64 step tensor's value), which every thread
// reads before any count is incremented. A count no integer holds (negative,
// NaN: only a hand-made state has one) counts as 0.
ADADELTA_HOST_DEVICE uint64_t stochastic_round_step(double count_before) {
  return (count_before >= 0 && count_before < 0x1p64 ? static_cast<uint64_t>(count_before) : 0) + 1;
}

// 32 random bits for element `index` of the param's flat array: a 32-bit hash
// (Wellons' lowbias32), cheap on 32-bit SIMD lanes, of the index and the key.
ADADELTA_HOST_DEVICE uint32_t stochastic_round_bits(uint64_t key, uint64_t index) {
  uint32_t x = static_cast<uint32_t>(index) ^ static_cast<uint32_t>(key) ^
      static_cast<uint32_t>(index >> 32) * 0x9e3779b9u;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x ^ static_cast<uint32_t>(key >> 32);
}

constexpr uint32_t kSignBit = 0x80000000u;

// `value` rounded stochastically with `random` (NOTE [Stochastic rounding]) to
// a float bfloat16 holds exactly, or, at the edges, `value` itself.
ADADELTA_HOST_DEVICE float stochastic_round_to_bfloat16(float value, uint32_t random) {
  const uint32_t bits = bits_of(value);
  const uint32_t magnitude = bits & ~kSignBit;
  constexpr uint32_t kLargest = 0x7f7f0000u;  // the largest finite bfloat16
  if (magnitude > kLargest) {
    return value;  // inf, NaN, or past the largest finite bfloat16
  }
  // No carry passes kLargest, whose 16 low bits are zero.
  return float_of((bits & kSignBit) | ((magnitude + (random & 0xffffu)) & 0xffff0000u));
}

// The same for float16, whose spacing is not bfloat16's. Written without
// branches (each case computed, one selected), so that the CPU kernel's loop
// over a vector's lanes vectorizes and a CUDA warp does not diverge.
ADADELTA_HOST_DEVICE float stochastic_round_to_float16(float value, uint32_t random) {
  const uint32_t bits = bits_of(value);
  const uint32_t magnitude = bits & ~kSignBit;
  const uint32_t sign = bits & kSignBit;
  constexpr uint32_t kLargest = 0x477fe000u;  // 65504, the largest finite float16
  constexpr uint32_t kSmallest = 0x33800000u;  // 2^-24, its smallest subnormal
  // From 2^-24 up: 13 bits below float16's 10-bit significand from 2^-14 up,
  // one more per binade below (at most 23; the bound matters only to lanes
  // whose result is not taken).
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  const int cut = exponent >= -14 ? 13 : (exponent >= -24 ? -1 - exponent : 23);
  const uint32_t below = (1u << cut) - 1u;
  // No carry passes kLargest, whose 13 low bits are zero.
  const uint32_t carried = sign | ((magnitude + (random & below)) & ~below);
  // Under 2^-24: up with probability |value| / 2^-24, from 24 random bits; both sides exact.
  const bool up = static_cast<float>(static_cast<int32_t>(random >> 8)) <
      float_of(magnitude) * 281474976710656.0f;
  const uint32_t tiny = sign | (up ? kSmallest : 0u);
  // Inf, NaN, or past the largest finite float16: left to the store.
  return magnitude > kLargest ? value : float_of(magnitude < kSmallest ? tiny : carried);
}

} // namespace

} // namespace adadelta_ext
