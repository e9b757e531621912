// CUDA kernels of igfast::accumulate_steps and igfast::scale_by_difference.
// accumulate_steps: each thread owns a pack of accumulator elements, keeps it in
// registers while it reads the k gradient rows (summing them in float64), and
// writes it back once.
#include "cuda/launch.cuh"
#include "cuda/launchers.h"

namespace igfast::cuda {
namespace {

template <typename scalar_t, typename acc_t, int N>
__global__ void accumulate_steps_kernel(acc_t* __restrict__ acc, const scalar_t* __restrict__ grads,
                                        const acc_t* __restrict__ weights, int64_t steps, int64_t elements) {
  using GradPack = Pack<scalar_t, N>;
  const int64_t packs = elements / N;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t element = p * N;
    // The chunk's steps are summed in float64 and added to the accumulator once (a
    // running float32 sum over thousands of steps drifts; see accumulate_cpu.cpp).
    double sum[N];
#pragma unroll
    for (int v = 0; v < N; ++v) sum[v] = 0.0;
#pragma unroll 4
    for (int64_t s = 0; s < steps; ++s) {
      const GradPack g = *reinterpret_cast<const GradPack*>(grads + s * elements + element);
      const double w = static_cast<double>(weights[s]);
#pragma unroll
      for (int v = 0; v < N; ++v) sum[v] += w * static_cast<double>(g.v[v]);
    }
#pragma unroll
    for (int v = 0; v < N; ++v) acc[element + v] = static_cast<acc_t>(static_cast<double>(acc[element + v]) + sum[v]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void scale_by_difference_kernel(acc_t* __restrict__ out, const acc_t* __restrict__ acc,
                                           const scalar_t* __restrict__ x, const scalar_t* __restrict__ b,
                                           int64_t elements, int64_t features, bool broadcast_baseline) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < elements;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t baseline = b[broadcast_baseline ? j % features : j];
    out[j] = acc[j] * static_cast<acc_t>(static_cast<scalar_t>(x[j] - baseline));
  }
}

}  // namespace

cudaError_t launch_accumulate_steps(const at::Tensor& accumulator, const AccumulationPlan& plan,
                                    cudaStream_t stream) {
  const int64_t elements = plan.elements, steps = plan.steps;
  return dispatch_floating(plan.grads.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int N = VectorWidth<scalar_t>::value;
    const scalar_t* g = plan.grads.const_data_ptr<scalar_t>();
    acc_t* acc = accumulator.mutable_data_ptr<acc_t>();
    const acc_t* w = plan.weights.const_data_ptr<acc_t>();
    if (elements % N == 0 && aligned16(g)) {
      accumulate_steps_kernel<scalar_t, acc_t, N><<<blocks_for(elements / N), kThreads, 0, stream>>>(
          acc, g, w, steps, elements);
    } else {
      accumulate_steps_kernel<scalar_t, acc_t, 1><<<blocks_for(elements), kThreads, 0, stream>>>(
          acc, g, w, steps, elements);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_scale_by_difference(const ScalingPlan& plan, cudaStream_t stream) {
  const int64_t elements = plan.out.numel();
  return dispatch_floating(plan.inputs.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = at::opmath_type<scalar_t>;
    scale_by_difference_kernel<scalar_t, acc_t><<<blocks_for(elements), kThreads, 0, stream>>>(
        plan.out.mutable_data_ptr<acc_t>(), plan.accumulator.const_data_ptr<acc_t>(),
        plan.inputs.const_data_ptr<scalar_t>(), plan.baselines.const_data_ptr<scalar_t>(), elements,
        plan.features, plan.broadcast_baseline);
    return cudaGetLastError();
  });
}

}  // namespace igfast::cuda
