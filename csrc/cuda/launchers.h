// The CUDA launchers of the igfast ops, between the host code (ops_cuda.cpp,
// compiled by the C++ compiler) and the kernels (*.cu, compiled by nvcc).
//
// Why the split: on the first GPU run (H200, torch 2.11 + CUDA 13) every
// argument error thrown while an nvcc-compiled frame was on the stack killed the
// process with a segmentation fault instead of reaching Python. So everything
// that may throw (the checks in the plans, the device guard, the CUDA error
// checks) runs in ops_cuda.cpp, and a launcher only starts kernels on checked
// arguments and returns the launch's status.
#pragma once

#include <cuda_runtime_api.h>

#include "igfast.h"

namespace igfast::cuda {

cudaError_t launch_interpolate_path(const InterpolationPlan& plan, cudaStream_t stream);
cudaError_t launch_accumulate_steps(const at::Tensor& accumulator, const AccumulationPlan& plan,
                                    cudaStream_t stream);
cudaError_t launch_scale_by_difference(const ScalingPlan& plan, cudaStream_t stream);

}  // namespace igfast::cuda
