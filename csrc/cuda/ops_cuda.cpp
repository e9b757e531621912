// The CUDA backend of the igfast ops, host side: check the arguments (the shared
// plans), select the device and stream, start the kernels (launchers.h) and turn
// a failed launch into a c10::Error. Compiled by the C++ compiler, not nvcc, so
// that every exception is thrown and unwound outside nvcc-compiled frames
// (launchers.h says why).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launchers.h"

namespace igfast::cuda {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

at::Tensor interpolate_path_cuda(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas,
                                 int64_t step_begin, int64_t step_end) {
  const InterpolationPlan plan = plan_interpolate_path(inputs, baselines, alphas, step_begin, step_end);
  if (plan.path.numel() == 0) return plan.path;
  const c10::cuda::CUDAGuard guard(inputs.device());
  C10_CUDA_CHECK(launch_interpolate_path(plan, current_stream()));
  return plan.path;
}

void interpolate_path_into_cuda(const at::Tensor& out, const at::Tensor& inputs, const at::Tensor& baselines,
                                const at::Tensor& alphas, int64_t step_begin, int64_t step_end) {
  const InterpolationPlan plan = plan_interpolate_path(inputs, baselines, alphas, step_begin, step_end, out);
  if (plan.path.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(inputs.device());
  C10_CUDA_CHECK(launch_interpolate_path(plan, current_stream()));
}

void accumulate_steps_cuda(at::Tensor accumulator, const at::Tensor& grads, const at::Tensor& weights) {
  const AccumulationPlan plan = plan_accumulate_steps(accumulator, grads, weights);
  if (plan.elements == 0 || plan.steps == 0) return;
  const c10::cuda::CUDAGuard guard(accumulator.device());
  C10_CUDA_CHECK(launch_accumulate_steps(accumulator, plan, current_stream()));
}

at::Tensor scale_by_difference_cuda(const at::Tensor& accumulator, const at::Tensor& inputs,
                                    const at::Tensor& baselines) {
  const ScalingPlan plan = plan_scale_by_difference(accumulator, inputs, baselines);
  if (plan.out.numel() == 0) return plan.out;
  const c10::cuda::CUDAGuard guard(inputs.device());
  C10_CUDA_CHECK(launch_scale_by_difference(plan, current_stream()));
  return plan.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(igfast, CUDA, m) {
  m.impl("interpolate_path", &interpolate_path_cuda);
  m.impl("interpolate_path_into", &interpolate_path_into_cuda);
  m.impl("accumulate_steps", &accumulate_steps_cuda);
  m.impl("scale_by_difference", &scale_by_difference_cuda);
}

}  // namespace igfast::cuda
