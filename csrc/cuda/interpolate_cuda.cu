// CUDA kernel of igfast::interpolate_path. Each thread owns a few consecutive
// features of one example: it reads x and x' once, then writes that slice of the
// path for every step of the chunk (step-major rows). With 16-byte aligned rows
// (features divisible by the vector width) it moves whole 16-byte packs.
#include "cuda/launch.cuh"
#include "cuda/launchers.h"

namespace igfast::cuda {
namespace {

// b + a * d rounded as PyTorch rounds Captum's baseline + alpha * (input - baseline): the
// product to the input dtype, then the sum. nvcc contracts a * d + b into one fused
// multiply-add by default; the _rn intrinsics are never contracted (see the CPU loop,
// cpu/row_loops.h, for what one rounding less changed).
__device__ __forceinline__ float multiply_rounded(float a, float d) { return __fmul_rn(a, d); }
__device__ __forceinline__ double multiply_rounded(double a, double d) { return __dmul_rn(a, d); }
__device__ __forceinline__ float add_rounded(float a, float d) { return __fadd_rn(a, d); }
__device__ __forceinline__ double add_rounded(double a, double d) { return __dadd_rn(a, d); }

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ scalar_t captum_path_point(opmath_t b, opmath_t a, opmath_t d) {
  const opmath_t product = static_cast<opmath_t>(static_cast<scalar_t>(multiply_rounded(a, d)));
  return static_cast<scalar_t>(add_rounded(b, product));
}

template <typename scalar_t, typename opmath_t, int N>
__global__ void interpolate_path_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b,
                                        const opmath_t* __restrict__ alphas, scalar_t* __restrict__ out,
                                        int64_t steps, int64_t batch, int64_t features,
                                        bool broadcast_baseline) {
  using PackT = Pack<scalar_t, N>;
  const int64_t packs = batch * features / N;
  const int64_t step_stride = batch * features;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t element = p * N;
    const int64_t feature = element % features;
    const int64_t example = element / features;
    const PackT xs = *reinterpret_cast<const PackT*>(x + element);
    const PackT bs = *reinterpret_cast<const PackT*>(b + (broadcast_baseline ? feature : element));
    opmath_t base[N];
    opmath_t difference[N];
#pragma unroll
    for (int v = 0; v < N; ++v) {
      base[v] = static_cast<opmath_t>(bs.v[v]);
      // Rounded to the input dtype first, as PyTorch forms x - x'.
      difference[v] = static_cast<opmath_t>(static_cast<scalar_t>(xs.v[v] - bs.v[v]));
    }
    scalar_t* row = out + example * features + feature;
    for (int64_t s = 0; s < steps; ++s) {
      const opmath_t a = alphas[s];
      PackT result;
#pragma unroll
      for (int v = 0; v < N; ++v) result.v[v] = captum_path_point<scalar_t>(base[v], a, difference[v]);
      *reinterpret_cast<PackT*>(row + s * step_stride) = result;
    }
  }
}

}  // namespace

cudaError_t launch_interpolate_path(const InterpolationPlan& plan, cudaStream_t stream) {
  const int64_t steps = plan.steps, batch = plan.batch, features = plan.features;
  return dispatch_floating(plan.inputs.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int N = VectorWidth<scalar_t>::value;
    const scalar_t* x = plan.inputs.const_data_ptr<scalar_t>();
    const scalar_t* b = plan.baselines.const_data_ptr<scalar_t>();
    const opmath_t* a = plan.alphas.const_data_ptr<opmath_t>();
    scalar_t* out = plan.path.mutable_data_ptr<scalar_t>();
    const bool vectorised = features % N == 0 && aligned16(x) && aligned16(b) && aligned16(out);
    if (vectorised) {
      interpolate_path_kernel<scalar_t, opmath_t, N><<<blocks_for(batch * features / N), kThreads, 0, stream>>>(
          x, b, a, out, steps, batch, features, plan.broadcast_baseline);
    } else {
      interpolate_path_kernel<scalar_t, opmath_t, 1><<<blocks_for(batch * features), kThreads, 0, stream>>>(
          x, b, a, out, steps, batch, features, plan.broadcast_baseline);
    }
    return cudaGetLastError();
  });
}

}  // namespace igfast::cuda
