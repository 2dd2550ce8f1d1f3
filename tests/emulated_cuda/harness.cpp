// The CUDA kernel and its launch, compiled by the host compiler against this
// folder's emulated CUDA headers, behind a C interface that
// tests/cuda_emulation.py calls with ctypes. ADADELTA_LAUNCH_SOURCE is
// csrc/cuda/adadelta_cuda_launch.cu with its one `<<<...>>>` rewritten into a
// call of emulated_launch (cuda_runtime.h); the kernel it includes is unchanged.
#include ADADELTA_LAUNCH_SOURCE

#include <cstring>

using adadelta_ext::AdadeltaHyperparams;
using adadelta_ext::ParamRounding;
using namespace adadelta_ext::cuda;

namespace {

using Launch = cudaError_t (*)(
    const AdadeltaTensorPointers*, size_t, const AdadeltaStepScalars<double>&, cudaStream_t);

// The 16-bit params' instances with one way of rounding the param.
#define EMULATED_16_BIT_INSTANCES(rounding)                                           \
  &launch_multi_tensor_adadelta<__half, __half, __half, rounding>,                    \
      &launch_multi_tensor_adadelta<__half, __half, float, rounding>,                 \
      &launch_multi_tensor_adadelta<__half, float, __half, rounding>,                 \
      &launch_multi_tensor_adadelta<__half, float, float, rounding>,                  \
      &launch_multi_tensor_adadelta<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, rounding>, \
      &launch_multi_tensor_adadelta<__nv_bfloat16, __nv_bfloat16, float, rounding>,   \
      &launch_multi_tensor_adadelta<__nv_bfloat16, float, __nv_bfloat16, rounding>,   \
      &launch_multi_tensor_adadelta<__nv_bfloat16, float, float, rounding>

// The instances fused_adadelta_cuda.cpp launches, numbered as
// tests/cuda_emulation.py numbers (param, grad, state) dtypes and roundings.
constexpr Launch kInstances[] = {
    &launch_multi_tensor_adadelta<float, float, float, ParamRounding::kNearest>,
    &launch_multi_tensor_adadelta<double, double, double, ParamRounding::kNearest>,
    &launch_multi_tensor_adadelta<double, float, double, ParamRounding::kNearest>,
    EMULATED_16_BIT_INSTANCES(ParamRounding::kNearest),
    EMULATED_16_BIT_INSTANCES(ParamRounding::kKahan),
    EMULATED_16_BIT_INSTANCES(ParamRounding::kStochastic),
};

DeviceScalar device_scalar(const void* address, int is_double) {
  return DeviceScalar{address, is_double != 0};
}

} // namespace

extern "C" {

// One call of the launch for `count` params of instance `instance`: pointers
// holds param, grad, square_avg, acc_delta and step of each param in turn;
// options holds lr, rho, eps and weight_decay. Scalar tensors are null when
// not given, and so are compensations and seeds where the instance does not
// read them. Returns the launch's cudaError_t.
int emulated_fused_adadelta(
    int instance,
    size_t count,
    void* const* pointers,
    const unsigned char* step_is_double,
    const int64_t* numels,
    void* const* compensations,
    const uint64_t* stochastic_round_seeds,
    const double* options,
    int maximize,
    int round_lr_product,
    const void* lr,
    int lr_is_double,
    const void* grad_scale,
    int grad_scale_is_double,
    const void* found_inf,
    int found_inf_is_double) {
  std::vector<AdadeltaTensorPointers> tensors(count);
  for (size_t i = 0; i < count; ++i) {
    void* const* p = pointers + 5 * i;
    tensors[i] = AdadeltaTensorPointers{
        p[0], p[1], p[2], p[3], p[4], step_is_double[i] != 0, numels[i],
        compensations != nullptr ? compensations[i] : nullptr,
        stochastic_round_seeds != nullptr ? stochastic_round_seeds[i] : 0};
  }
  const double rho = options[1];
  const AdadeltaStepScalars<double> scalars{
      AdadeltaHyperparams<double>{
          options[0], rho, 1.0 - rho, options[2], options[3], maximize != 0, options[3] != 0,
          1.0 - rho == 1.0, lr != nullptr && round_lr_product != 0},
      device_scalar(lr, lr_is_double),
      device_scalar(grad_scale, grad_scale_is_double),
      device_scalar(found_inf, found_inf_is_double)};
  return kInstances[instance](tensors.data(), count, scalars, nullptr);
}

// launch_increment_steps for `count` step counters. Returns its cudaError_t.
int emulated_increment_steps(
    size_t count,
    void* const* steps,
    const unsigned char* step_is_double,
    const void* found_inf,
    int found_inf_is_double) {
  std::vector<AdadeltaTensorPointers> tensors(count);
  for (size_t i = 0; i < count; ++i) {
    tensors[i].step = steps[i];
    tensors[i].step_is_double = step_is_double[i] != 0;
  }
  return launch_increment_steps(tensors.data(), count, device_scalar(found_inf, found_inf_is_double), nullptr);
}

// How the next launches run: order 0 ascending (block, thread), 1 descending,
// 2 shuffled with `seed`; on a device of compute capability major
// `compute_capability_major` with a driver of `driver_version` (1000 * major
// + 10 * minor, as cudaDriverGetVersion), whose argument limit they decide
// (emulated_max_argument_bytes).
void emulated_configure(int order, unsigned int seed, int driver_version, int compute_capability_major) {
  emulated_launches.order = order;
  emulated_launches.seed = seed;
  emulated_launches.driver_version = driver_version;
  emulated_launches.compute_capability_major = compute_capability_major;
  emulated_launches.blocks.clear();
  emulated_launches.argument_bytes.clear();
}

// The launches since emulated_configure: their count, and up to `capacity`
// of their grid sizes and argument sizes.
size_t emulated_launches_made(unsigned int* grids, size_t* argument_bytes, size_t capacity) {
  const size_t count = emulated_launches.blocks.size();
  const size_t copied = std::min(count, capacity);
  std::memcpy(grids, emulated_launches.blocks.data(), copied * sizeof(unsigned int));
  std::memcpy(argument_bytes, emulated_launches.argument_bytes.data(), copied * sizeof(size_t));
  return count;
}

// The emulated 16-bit conversions, over arrays: kind 0 half to float, 1 float
// to half, 2 bfloat16 to float, 3 float to bfloat16.
void emulated_convert(int kind, const void* input, void* output, size_t count) {
  const auto* bits = static_cast<const uint16_t*>(input);
  const auto* floats = static_cast<const float*>(input);
  auto* out_bits = static_cast<uint16_t*>(output);
  auto* out_floats = static_cast<float*>(output);
  for (size_t i = 0; i < count; ++i) {
    switch (kind) {
      case 0: out_floats[i] = __half2float(__half{bits[i]}); break;
      case 1: out_bits[i] = __float2half_rn(floats[i]).bits; break;
      case 2: out_floats[i] = __bfloat162float(__nv_bfloat16{bits[i]}); break;
      default: out_bits[i] = __float2bfloat16_rn(floats[i]).bits; break;
    }
  }
}

} // extern "C"
