// The multi-tensor Adadelta kernel: one launch updates many tensors. Each
// tensor is cut into chunks of kChunkElements, and each block updates one
// chunk of one tensor, found from metadata passed by value as a kernel
// argument. Launched by adadelta_cuda_launch.cu.
//
// NOTE: why not ATen's MultiTensorApply.cuh. It is the model (metadata by
// value, chunks, 16-byte vectors where aligned, and since torch 2.5 its 32 KB
// argument layout, chosen as below), but it includes ATen, so a kernel built
// on it compiles only against a CUDA build of torch. This kernel includes no
// torch header: nvcc compiles it alone, which lets CI (a CPU torch) build it
// for every architecture and check its PTX, and lets the math of
// adadelta_math.h be shared with the CPU kernel unchanged.
//
// NOTE [Two argument layouts]
// Kernel arguments may take 32,764 bytes where the toolkit is CUDA 12.1 or
// newer (CUDART_VERSION >= 12010), the driver is too (12.1, r530: a 12.x
// build may run on an older 12.x driver under minor version compatibility)
// and the GPU is Volta (sm_70) or newer; elsewhere 4,096 bytes. One launch
// holds 616 tensors in the first layout, 75 in the second
// (MultiTensorLaunchMetadata<kArgumentBytes>). The launch picks the layout at
// run time (large_kernel_arguments_supported in adadelta_cuda_launch.cu); a
// CUDA 12.1+ build compiles both kernels for every Volta+ architecture, and
// for older ones only the 4 KB kernel: ptxas rejects an entry with over 4 KB
// of parameters there, so the 32 KB kernel is only declared, and never
// launched, in their device code. A build with an older toolkit has the 4 KB
// layout only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../adadelta_math.h"
#include "adadelta_cuda_launch.h"

namespace adadelta_ext::cuda {

// With IEEE sqrt and division (no fast math: parity with torch) a thread
// takes 48 (float) to 68 (double) registers; blocks of 256 fill an SM's
// register file more fully at those counts than blocks of 512 do.
constexpr int kThreadsPerBlock = 256;
// Small enough that a few mid-sized tensors still make blocks for every SM
// (one 1M-element tensor: 245 blocks), large enough that a block's start
// (the scalars, the search for its tensor) is a few percent of its work.
constexpr int kChunkElements = 4096;
// Elements per thread per pass of the element-wise path: its loads of one
// pass are independent, so they are in flight together.
constexpr int kElementwiseIlp = 4;
constexpr int64_t kMaxBlocksPerLaunch = 2147483647;  // gridDim.x limit

// The kernel argument limits of NOTE [Two argument layouts].
constexpr int kSmallArgumentBytes = 4096;
constexpr int kLargeArgumentBytes = 32764;
// Volta: the first architecture with 32 KB of kernel arguments. A macro only
// so that CI, whose nvcc builds nothing older than sm_75, can compile the
// pre-Volta device code path (tests/build_and_style/test_cuda_build.py).
#ifndef ADADELTA_EXT_LARGE_ARGUMENTS_MIN_ARCH
#define ADADELTA_EXT_LARGE_ARGUMENTS_MIN_ARCH 700
#endif

// Bytes of metadata per tensor: five pointers, numel, block end, step dtype;
// with Kahan summation a compensation pointer, with stochastic rounding a seed.
constexpr int metadata_bytes_per_tensor(ParamRounding rounding) {
  return 5 * sizeof(void*) + sizeof(int64_t) + sizeof(int32_t) + sizeof(bool) +
      (rounding == ParamRounding::kNearest ? 0 : 8);
}

// The most tensors whose metadata fits in argument_bytes beside the scalars
// (and tensor_count, with its padding).
constexpr int max_tensors_per_launch(int argument_bytes, ParamRounding rounding) {
  return (argument_bytes - static_cast<int>(sizeof(AdadeltaStepScalars<double>)) - 16) /
      metadata_bytes_per_tensor(rounding);
}

// The metadata only the pure 16-bit options need (adadelta_math.h).
template <int kMaxTensors, ParamRounding kRounding>
struct RoundingMetadata {};
template <int kMaxTensors>
struct RoundingMetadata<kMaxTensors, ParamRounding::kKahan> {
  void* compensations[kMaxTensors];
};
template <int kMaxTensors>
struct RoundingMetadata<kMaxTensors, ParamRounding::kStochastic> {
  uint64_t stochastic_round_seeds[kMaxTensors];
};

// What one launch updates. Blocks are numbered through the tensors in order:
// tensor i owns blocks [block_ends[i - 1], block_ends[i]) (from 0 for i = 0),
// one per chunk; a zero-element tensor owns one block, which only increments
// its step. A tensor never spans two launches, so its step is incremented
// once, by the block of its chunk 0 (under stochastic rounding, by
// increment_steps_kernel after the update).
template <int kArgumentBytes, ParamRounding kRounding = ParamRounding::kNearest>
struct MultiTensorLaunchMetadata
    : RoundingMetadata<max_tensors_per_launch(kArgumentBytes, kRounding), kRounding> {
  static constexpr int kMaxTensors = max_tensors_per_launch(kArgumentBytes, kRounding);
  void* params[kMaxTensors];
  void* grads[kMaxTensors];
  void* square_avgs[kMaxTensors];
  void* acc_deltas[kMaxTensors];
  void* steps[kMaxTensors];
  int64_t numels[kMaxTensors];
  int32_t block_ends[kMaxTensors];
  bool step_is_double[kMaxTensors];
  int tensor_count;
};

static_assert(MultiTensorLaunchMetadata<kSmallArgumentBytes>::kMaxTensors == 75);
static_assert(MultiTensorLaunchMetadata<kLargeArgumentBytes>::kMaxTensors == 616);
static_assert(MultiTensorLaunchMetadata<kSmallArgumentBytes, ParamRounding::kKahan>::kMaxTensors == 65);
static_assert(MultiTensorLaunchMetadata<kLargeArgumentBytes, ParamRounding::kKahan>::kMaxTensors == 535);

template <int kArgumentBytes, ParamRounding kRounding>
constexpr bool arguments_fit() {
  return sizeof(MultiTensorLaunchMetadata<kArgumentBytes, kRounding>) +
      sizeof(AdadeltaStepScalars<double>) <= kArgumentBytes;
}
static_assert(
    arguments_fit<kSmallArgumentBytes, ParamRounding::kNearest>() &&
        arguments_fit<kSmallArgumentBytes, ParamRounding::kKahan>() &&
        arguments_fit<kSmallArgumentBytes, ParamRounding::kStochastic>(),
    "the 4 KB layout's arguments must fit in 4,096 bytes");
static_assert(
    arguments_fit<kLargeArgumentBytes, ParamRounding::kNearest>() &&
        arguments_fit<kLargeArgumentBytes, ParamRounding::kKahan>() &&
        arguments_fit<kLargeArgumentBytes, ParamRounding::kStochastic>(),
    "the 32 KB layout's arguments must fit in 32,764 bytes");

// The step counters that increment_steps_kernel increments: as many as 4 KB of
// arguments hold, so that it compiles for every architecture.
constexpr int kMaxStepCounters = 448;
struct StepCounters {
  void* steps[kMaxStepCounters];
  bool step_is_double[kMaxStepCounters];
  int count;
};
static_assert(sizeof(StepCounters) + sizeof(DeviceScalar) <= kSmallArgumentBytes);

__device__ __forceinline__ float to_opmath(float value) {
  return value;
}
__device__ __forceinline__ double to_opmath(double value) {
  return value;
}
__device__ __forceinline__ float to_opmath(__half value) {
  return __half2float(value);
}
__device__ __forceinline__ float to_opmath(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

// One rounding, to nearest even, as torch's own conversions round.
template <typename T>
__device__ __forceinline__ T from_opmath(opmath_t<T> value) {
  return value;
}
template <>
__device__ __forceinline__ __half from_opmath<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_opmath<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

// The rounding of the grad stored back by GradScaler unscaling: to its dtype,
// from the param's opmath (float32 grads of a float64 param: double to float).
template <typename T, typename opmath>
__device__ __forceinline__ opmath round_to(opmath value) {
  return to_opmath(from_opmath<T>(static_cast<opmath_t<T>>(value)));
}

// IEEE operations with one rounding each, to nearest even, whatever nvcc's
// --fmad (see NOTE [One rounding per op, written out] in adadelta_math.h).
struct DeviceRounding {
  __device__ __forceinline__ static float mul(float a, float b) {
    return __fmul_rn(a, b);
  }
  __device__ __forceinline__ static double mul(double a, double b) {
    return __dmul_rn(a, b);
  }
  __device__ __forceinline__ static float add(float a, float b) {
    return __fadd_rn(a, b);
  }
  __device__ __forceinline__ static double add(double a, double b) {
    return __dadd_rn(a, b);
  }
  __device__ __forceinline__ static float sub(float a, float b) {
    return __fsub_rn(a, b);
  }
  __device__ __forceinline__ static double sub(double a, double b) {
    return __dsub_rn(a, b);
  }
  __device__ __forceinline__ static float div(float a, float b) {
    return __fdiv_rn(a, b);
  }
  __device__ __forceinline__ static double div(double a, double b) {
    return __ddiv_rn(a, b);
  }
  __device__ __forceinline__ static float sqrt(float a) {
    return __fsqrt_rn(a);
  }
  __device__ __forceinline__ static double sqrt(double a) {
    return __dsqrt_rn(a);
  }
  __device__ __forceinline__ static float fma(float a, float b, float c) {
    return __fmaf_rn(a, b, c);
  }
  __device__ __forceinline__ static double fma(double a, double b, double c) {
    return __fma_rn(a, b, c);
  }
};

// 16 bytes of T, moved by one 128-bit load or store.
template <typename T>
struct alignas(16) AlignedVector {
  static constexpr int kSize = 16 / sizeof(T);
  T elements[kSize];
};

constexpr int max_of(int a, int b, int c) {
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

// kCount consecutive elements of the chunk from `first`, moved 16 bytes at a
// time: only for chunks whose four pointers are 16-byte aligned.
template <int kCount>
struct ContiguousElements {
  static constexpr int kElements = kCount;
  int first;

  // The chunk's element that values[i] holds.
  __device__ __forceinline__ int index(int i) const {
    return first + i;
  }

  template <typename T, typename opmath>
  __device__ __forceinline__ void load(const T* chunk, opmath (&values)[kCount]) const {
    using Vector = AlignedVector<T>;
    static_assert(kCount % Vector::kSize == 0, "whole vectors only");
#pragma unroll
    for (int v = 0; v < kCount / Vector::kSize; ++v) {
      const Vector vector =
          *reinterpret_cast<const Vector*>(chunk + first + v * Vector::kSize);
#pragma unroll
      for (int i = 0; i < Vector::kSize; ++i) {
        values[v * Vector::kSize + i] = to_opmath(vector.elements[i]);
      }
    }
  }

  template <typename T, typename opmath>
  __device__ __forceinline__ void store(T* chunk, const opmath (&values)[kCount]) const {
    using Vector = AlignedVector<T>;
#pragma unroll
    for (int v = 0; v < kCount / Vector::kSize; ++v) {
      Vector vector;
#pragma unroll
      for (int i = 0; i < Vector::kSize; ++i) {
        vector.elements[i] = from_opmath<T>(values[v * Vector::kSize + i]);
      }
      *reinterpret_cast<Vector*>(chunk + first + v * Vector::kSize) = vector;
    }
  }
};

// The elements first, first + kThreadsPerBlock, ... (kCount of them) that
// lie below end, one at a time: any alignment.
template <int kCount>
struct StridedElements {
  static constexpr int kElements = kCount;
  int first;
  int end;

  __device__ __forceinline__ int index(int i) const {
    return first + i * kThreadsPerBlock;
  }

  template <typename T, typename opmath>
  __device__ __forceinline__ void load(const T* chunk, opmath (&values)[kCount]) const {
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      // Past the end, a harmless value: it is updated but never stored.
      values[i] = index(i) < end ? to_opmath(chunk[index(i)]) : opmath(0);
    }
  }

  template <typename T, typename opmath>
  __device__ __forceinline__ void store(T* chunk, const opmath (&values)[kCount]) const {
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      if (index(i) < end) {
        chunk[index(i)] = from_opmath<T>(values[i]);
      }
    }
  }
};

// The first element of one chunk in each of a param's four tensors, and what
// the pure 16-bit options need of it.
template <typename param_t, typename grad_t, typename state_t>
struct ChunkPointers {
  param_t* param;
  grad_t* grad;
  state_t* square_avg;
  state_t* acc_delta;
  param_t* compensation;  // ParamRounding::kKahan
  uint64_t stochastic_round_key;  // ParamRounding::kStochastic
  int64_t begin;  // the index of the chunk's first element in the param
};

// `value` rounded stochastically to a value of param_t (NOTE [Stochastic rounding]).
template <typename param_t>
__device__ __forceinline__ float stochastic_round_to(float value, uint32_t random) {
  if constexpr (std::is_same_v<param_t, __nv_bfloat16>) {
    return stochastic_round_to_bfloat16(value, random);
  } else {
    static_assert(std::is_same_v<param_t, __half>, "for 16-bit params only");
    return stochastic_round_to_float16(value, random);
  }
}

// The step's scalars once read from the device.
template <typename opmath>
struct StepValues {
  AdadeltaHyperparams<opmath> hyper;
  bool unscale_grad;
  opmath inverse_grad_scale;  // float(1 / double(grad_scale)), as GradScaler.unscale_
};

// Reads each element once, writes it once (grad only when unscaling).
template <
    ParamRounding kRounding,
    typename Elements,
    typename param_t,
    typename grad_t,
    typename state_t,
    typename opmath>
__device__ __forceinline__ void update_elements(
    const ChunkPointers<param_t, grad_t, state_t>& chunk,
    const Elements& elements,
    const StepValues<opmath>& step) {
  constexpr int kCount = Elements::kElements;
  opmath param[kCount];
  opmath grad[kCount];
  opmath square_avg[kCount];
  opmath acc_delta[kCount];
  elements.load(chunk.param, param);
  elements.load(chunk.grad, grad);
  elements.load(chunk.square_avg, square_avg);
  elements.load(chunk.acc_delta, acc_delta);
  if (step.unscale_grad) {
    // The step uses the grad rounded to its dtype, as stored.
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      grad[i] = round_to<grad_t>(DeviceRounding::mul(grad[i], step.inverse_grad_scale));
    }
    elements.store(chunk.grad, grad);
  }
  if constexpr (kRounding == ParamRounding::kKahan) {
    opmath compensation[kCount];
    elements.load(chunk.compensation, compensation);
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      adadelta_update_kahan<DeviceRounding>(
          param[i], compensation[i], grad[i], square_avg[i], acc_delta[i], step.hyper,
          [](opmath value) { return round_to<param_t, opmath>(value); });
    }
    elements.store(chunk.compensation, compensation);
  } else {
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      adadelta_update<DeviceRounding>(param[i], grad[i], square_avg[i], acc_delta[i], step.hyper);
      if constexpr (kRounding == ParamRounding::kStochastic) {
        const uint32_t random = stochastic_round_bits(
            chunk.stochastic_round_key, static_cast<uint64_t>(chunk.begin + elements.index(i)));
        param[i] = stochastic_round_to<param_t>(param[i], random);
      }
    }
  }
  elements.store(chunk.param, param);
  elements.store(chunk.square_avg, square_avg);
  elements.store(chunk.acc_delta, acc_delta);
}

// Atomic: should two params share one step tensor, each adds one, as on the CPU.
__device__ __forceinline__ void increment_step(void* step, bool step_is_double) {
  if (step_is_double) {
    atomicAdd(static_cast<double*>(step), 1.0);
  } else {
    atomicAdd(static_cast<float*>(step), 1.0f);
  }
}

template <typename opmath>
__device__ __forceinline__ opmath read_scalar(const DeviceScalar& scalar) {
  return scalar.is_double
      ? static_cast<opmath>(*static_cast<const double*>(scalar.address))
      : static_cast<opmath>(*static_cast<const float*>(scalar.address));
}

__device__ __forceinline__ bool is_16_byte_aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

// The tensor owning `block`: the first whose block_ends[] exceeds it.
template <typename Metadata>
__device__ __forceinline__ int tensor_of_block(const Metadata& metadata, int block) {
  int low = 0;
  int high = metadata.tensor_count - 1;
  while (low < high) {
    const int middle = (low + high) / 2;
    if (metadata.block_ends[middle] > block) {
      high = middle;
    } else {
      low = middle + 1;
    }
  }
  return low;
}

// The work of one block: one chunk (see MultiTensorLaunchMetadata), in
// either layout. Taken by reference from the kernel's __grid_constant__
// arguments, which are read in place, not copied to local memory.
template <ParamRounding kRounding, typename param_t, typename grad_t, typename state_t, typename Metadata>
__device__ __forceinline__ void update_chunk_of_block(
    const Metadata& metadata,
    const AdadeltaStepScalars<opmath_t<param_t>>& scalars) {
  using opmath = opmath_t<param_t>;
  // The scalars are read before any branch on them, so their loads overlap.
  StepValues<opmath> step{scalars.hyper, scalars.grad_scale.address != nullptr, opmath(1)};
  if (scalars.lr.address != nullptr) {
    step.hyper.lr = read_scalar<opmath>(scalars.lr);
  }
  if (step.unscale_grad) {
    step.inverse_grad_scale = static_cast<float>(
        DeviceRounding::div(1.0, read_scalar<double>(scalars.grad_scale)));
  }
  // GradScaler found an inf or NaN: the whole step is skipped, steps included.
  if (scalars.found_inf.address != nullptr &&
      read_scalar<double>(scalars.found_inf) != 0) {
    return;
  }

  const int block = static_cast<int>(blockIdx.x);
  const int tensor = tensor_of_block(metadata, block);
  const int chunk_index = block - (tensor == 0 ? 0 : metadata.block_ends[tensor - 1]);
  const int64_t chunk_begin = static_cast<int64_t>(chunk_index) * kChunkElements;
  const int64_t remaining = metadata.numels[tensor] - chunk_begin;
  const int chunk_size =
      remaining < kChunkElements ? static_cast<int>(remaining) : kChunkElements;
  ChunkPointers<param_t, grad_t, state_t> chunk{
      static_cast<param_t*>(metadata.params[tensor]) + chunk_begin,
      static_cast<grad_t*>(metadata.grads[tensor]) + chunk_begin,
      static_cast<state_t*>(metadata.square_avgs[tensor]) + chunk_begin,
      static_cast<state_t*>(metadata.acc_deltas[tensor]) + chunk_begin,
      nullptr,
      0,
      chunk_begin};
  if constexpr (kRounding == ParamRounding::kKahan) {
    chunk.compensation = static_cast<param_t*>(metadata.compensations[tensor]) + chunk_begin;
  }
  if constexpr (kRounding == ParamRounding::kStochastic) {
    // No count is incremented before every block has read its count.
    const double count = metadata.step_is_double[tensor]
        ? *static_cast<const double*>(metadata.steps[tensor])
        : *static_cast<const float*>(metadata.steps[tensor]);
    chunk.stochastic_round_key =
        stochastic_round_key(metadata.stochastic_round_seeds[tensor], stochastic_round_step(count));
  }

  // Where the element-wise path starts: past the whole vectors, if any.
  int elementwise_begin = 0;
  if (is_16_byte_aligned(chunk.param) && is_16_byte_aligned(chunk.grad) &&
      is_16_byte_aligned(chunk.square_avg) && is_16_byte_aligned(chunk.acc_delta) &&
      (kRounding != ParamRounding::kKahan || is_16_byte_aligned(chunk.compensation))) {
    // Whole 16-byte vectors of every tensor per thread per pass: as many
    // elements as 16 bytes hold of the narrowest type.
    constexpr int kVectorElements = max_of(
        AlignedVector<param_t>::kSize, AlignedVector<grad_t>::kSize,
        AlignedVector<state_t>::kSize);
    elementwise_begin = chunk_size / kVectorElements * kVectorElements;
    for (int first = threadIdx.x * kVectorElements; first < elementwise_begin;
         first += kThreadsPerBlock * kVectorElements) {
      update_elements<kRounding>(chunk, ContiguousElements<kVectorElements>{first}, step);
    }
  }
  for (int first = elementwise_begin + threadIdx.x; first < chunk_size;
       first += kThreadsPerBlock * kElementwiseIlp) {
    update_elements<kRounding>(chunk, StridedElements<kElementwiseIlp>{first, chunk_size}, step);
  }

  if (kRounding != ParamRounding::kStochastic && chunk_index == 0 && threadIdx.x == 0) {
    increment_step(metadata.steps[tensor], metadata.step_is_double[tensor]);
  }
}

// Launched with kThreadsPerBlock threads and one block per chunk, in the
// layout of kArgumentBytes (NOTE [Two argument layouts]): the 4 KB one
// compiles for every architecture,
template <typename param_t, typename grad_t, typename state_t, int kArgumentBytes, ParamRounding kRounding>
__launch_bounds__(kThreadsPerBlock) __global__
    std::enable_if_t<(kArgumentBytes <= kSmallArgumentBytes)> multi_tensor_adadelta_kernel(
        const __grid_constant__ MultiTensorLaunchMetadata<kArgumentBytes, kRounding> metadata,
        const __grid_constant__ AdadeltaStepScalars<opmath_t<param_t>> scalars) {
  update_chunk_of_block<kRounding, param_t, grad_t, state_t>(metadata, scalars);
}

// the 32 KB one for Volta and newer, and is declared only for older ones.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= ADADELTA_EXT_LARGE_ARGUMENTS_MIN_ARCH
template <typename param_t, typename grad_t, typename state_t, int kArgumentBytes, ParamRounding kRounding>
__launch_bounds__(kThreadsPerBlock) __global__
    std::enable_if_t<(kArgumentBytes > kSmallArgumentBytes)> multi_tensor_adadelta_kernel(
        const __grid_constant__ MultiTensorLaunchMetadata<kArgumentBytes, kRounding> metadata,
        const __grid_constant__ AdadeltaStepScalars<opmath_t<param_t>> scalars) {
  update_chunk_of_block<kRounding, param_t, grad_t, state_t>(metadata, scalars);
}
#else
#pragma nv_diag_suppress 114  // "function was referenced but not defined"
template <typename param_t, typename grad_t, typename state_t, int kArgumentBytes, ParamRounding kRounding>
__launch_bounds__(kThreadsPerBlock) __global__
    std::enable_if_t<(kArgumentBytes > kSmallArgumentBytes)> multi_tensor_adadelta_kernel(
        const __grid_constant__ MultiTensorLaunchMetadata<kArgumentBytes, kRounding> metadata,
        const __grid_constant__ AdadeltaStepScalars<opmath_t<param_t>> scalars);
#pragma nv_diag_default 114
#endif

// Under stochastic rounding every block reads its tensor's step count (the
// key takes the count after this step), so the counts are incremented after
// the update, on the same stream: one block, a thread per counter. Skipped
// with the step when GradScaler found an inf or NaN.
__launch_bounds__(kThreadsPerBlock) __global__ void increment_steps_kernel(
    const __grid_constant__ StepCounters counters,
    const __grid_constant__ DeviceScalar found_inf) {
  if (found_inf.address != nullptr && read_scalar<double>(found_inf) != 0) {
    return;
  }
  for (int i = static_cast<int>(threadIdx.x); i < counters.count; i += kThreadsPerBlock) {
    increment_step(counters.steps[i], counters.step_is_double[i]);
  }
}

} // namespace adadelta_ext::cuda
