// CUDA kernels of igfast::accumulate_steps and igfast::scale_by_difference.
// accumulate_steps: each thread owns a pack of accumulator elements, keeps it in
// registers while it reads the k gradient rows, and writes it back once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "igfast.h"

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
    acc_t sum[N];
#pragma unroll
    for (int v = 0; v < N; ++v) sum[v] = acc[element + v];
#pragma unroll 4
    for (int64_t s = 0; s < steps; ++s) {
      const GradPack g = *reinterpret_cast<const GradPack*>(grads + s * elements + element);
      const acc_t w = weights[s];
#pragma unroll
      for (int v = 0; v < N; ++v) sum[v] += w * static_cast<acc_t>(g.v[v]);
    }
#pragma unroll
    for (int v = 0; v < N; ++v) acc[element + v] = sum[v];
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

void accumulate_steps_cuda(at::Tensor accumulator, const at::Tensor& grads_in, const at::Tensor& weights_in) {
  const c10::cuda::OptionalCUDAGuard guard(accumulator.device());
  const AccumulationPlan plan = plan_accumulate_steps(accumulator, grads_in, weights_in);
  const int64_t elements = plan.elements, steps = plan.steps;
  if (elements == 0 || steps == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.grads.scalar_type(), "accumulate_steps_cuda", [&] {
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
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor scale_by_difference_cuda(const at::Tensor& accumulator_in, const at::Tensor& inputs_in,
                                    const at::Tensor& baselines_in) {
  const c10::cuda::OptionalCUDAGuard guard(inputs_in.device());
  const ScalingPlan plan = plan_scale_by_difference(accumulator_in, inputs_in, baselines_in);
  const int64_t elements = plan.out.numel();
  if (elements == 0) return plan.out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.inputs.scalar_type(), "scale_by_difference_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scale_by_difference_kernel<scalar_t, acc_t><<<blocks_for(elements), kThreads, 0, stream>>>(
        plan.out.mutable_data_ptr<acc_t>(), plan.accumulator.const_data_ptr<acc_t>(),
        plan.inputs.const_data_ptr<scalar_t>(), plan.baselines.const_data_ptr<scalar_t>(), elements,
        plan.features, plan.broadcast_baseline);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(igfast, CUDA, m) {
  m.impl("accumulate_steps", &accumulate_steps_cuda);
  m.impl("scale_by_difference", &scale_by_difference_cuda);
}

}  // namespace igfast::cuda
