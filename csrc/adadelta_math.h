// The Adadelta update of one element (or one SIMD vector of elements).
//
// This header includes no torch header, so nvcc can compile the CUDA kernels
// alone (see csrc/cuda/adadelta_cuda_kernel.cuh) on a machine whose torch has
// no CUDA headers. The CPU kernel instantiates it with at::vec::Vectorized,
// the CUDA kernel with float or double: the math is written once, here.
#pragma once

#if defined(__CUDACC__)
#define ADADELTA_HOST_DEVICE __host__ __device__ __forceinline__
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

template <typename Ops, typename T>
ADADELTA_HOST_DEVICE void adadelta_update(
    T& param,
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
  param = hyper.lr_product_rounded ? Ops::add(param, Ops::mul(update, -hyper.lr))
                                   : Ops::fma(-hyper.lr, update, param);
}

} // namespace adadelta_ext
