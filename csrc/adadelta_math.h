// The Adadelta update of one element (or one SIMD vector of elements).
//
// This header includes no torch header, so nvcc can compile the CUDA kernels
// alone (see csrc/cuda/adadelta_cuda_kernel.cuh) on a machine whose torch has
// no CUDA headers. The CPU kernel instantiates it with at::vec::Vectorized,
// the CUDA kernel with float or double: the math is written once, here.
#pragma once

#include <cmath>

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
};

// SIMD vectors (at::vec::Vectorized) bring their own sqrt().
template <typename T>
ADADELTA_HOST_DEVICE T adadelta_sqrt(T x) {
  return x.sqrt();
}
template <>
ADADELTA_HOST_DEVICE float adadelta_sqrt<float>(float x) {
  return ::sqrtf(x);
}
template <>
ADADELTA_HOST_DEVICE double adadelta_sqrt<double>(double x) {
  return ::sqrt(x);
}

// One Adadelta step, in the order torch.optim.Adadelta applies it:
//
//   g          = -grad if maximize else grad
//   g          = g + weight_decay * param              (weight_decay != 0)
//   square_avg = rho * square_avg + (1 - rho) * g * g
//   update     = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
//   acc_delta  = rho * acc_delta + (1 - rho) * update * update
//   param      = param - lr * update
//
// The products keep torch's association ((1 - rho) * g) * g so that float32
// results on the CPU match torch.optim.Adadelta's foreach kernels.
template <typename T>
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
    grad = grad + hyper.weight_decay * param;
  }
  square_avg = hyper.rho * square_avg + hyper.one_minus_rho * grad * grad;
  const T update = adadelta_sqrt(acc_delta + hyper.eps) /
      adadelta_sqrt(square_avg + hyper.eps) * grad;
  acc_delta = hyper.rho * acc_delta + hyper.one_minus_rho * update * update;
  param = param - hyper.lr * update;
}

} // namespace adadelta_ext
