// CPU kernel of igfast::interpolate_path: one pass that reads x and x' once and
// writes every step's path rows, step-major, straight into the output.
//
// The rows of one step form a single contiguous run of B * F elements, so work
// is tiled over blocks of that flat range: each task forms the difference
// x - x' of its block once (in opmath, in an L2-sized per-thread buffer), then
// writes the block for every step with long vectorised loops. The baseline is
// read in place (a broadcast one example by example), except that short
// broadcast rows are first expanded over the block so the loops stay long.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/row_loops.h"
#include "igfast.h"

namespace igfast::cpu {
namespace {

void write_path(const InterpolationPlan& plan) {
  if (plan.path.numel() == 0) return;
  const int64_t steps = plan.steps, features = plan.features;
  const int64_t elements = plan.batch * features;  // one step's rows
  const int64_t blocks = (elements + kPathBlock - 1) / kPathBlock;
  const int64_t block = std::min(elements, kPathBlock);
  const bool expand = plan.broadcast_baseline && features < kMinRun;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.inputs.scalar_type(), "interpolate_path_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = plan.inputs.const_data_ptr<scalar_t>();
    const scalar_t* b = plan.baselines.const_data_ptr<scalar_t>();
    const opmath_t* a = plan.alphas.const_data_ptr<opmath_t>();
    scalar_t* out = plan.path.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain_for(block * (steps + 1)), [&](int64_t begin, int64_t end) {
      opmath_t* difference = scratch_buffer<opmath_t, 0>(block);
      scalar_t* expanded = scratch_buffer<scalar_t, 1>(expand ? block : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t j0 = task * kPathBlock;
        const int64_t n = std::min(kPathBlock, elements - j0);
        if (!plan.broadcast_baseline) {
          difference_row(x + j0, b + j0, difference, n);
          for (int64_t s = 0; s < steps; ++s) {
            interpolate_row(out + s * elements + j0, b + j0, difference, a[s], n);
          }
          continue;
        }
        // Runs of the block that stay within one example's features.
        for (int64_t j = j0; j < j0 + n;) {
          const int64_t feature = j % features;
          const int64_t run = std::min(features - feature, j0 + n - j);
          difference_row(x + j, b + feature, difference + (j - j0), run);
          if (expand) std::copy(b + feature, b + feature + run, expanded + (j - j0));
          j += run;
        }
        for (int64_t s = 0; s < steps; ++s) {
          scalar_t* out_block = out + s * elements + j0;
          if (expand) {
            interpolate_row(out_block, expanded, difference, a[s], n);
            continue;
          }
          for (int64_t j = j0; j < j0 + n;) {
            const int64_t feature = j % features;
            const int64_t run = std::min(features - feature, j0 + n - j);
            interpolate_row(out_block + (j - j0), b + feature, difference + (j - j0), a[s], run);
            j += run;
          }
        }
      }
    });
  });
}

at::Tensor interpolate_path_cpu(const at::Tensor& inputs, const at::Tensor& baselines, const at::Tensor& alphas,
                                int64_t step_begin, int64_t step_end) {
  const InterpolationPlan plan = plan_interpolate_path(inputs, baselines, alphas, step_begin, step_end);
  write_path(plan);
  return plan.path;
}

void interpolate_path_into_cpu(const at::Tensor& out, const at::Tensor& inputs, const at::Tensor& baselines,
                               const at::Tensor& alphas, int64_t step_begin, int64_t step_end) {
  write_path(plan_interpolate_path(inputs, baselines, alphas, step_begin, step_end, out));
}

}  // namespace

TORCH_LIBRARY_IMPL(igfast, CPU, m) {
  m.impl("interpolate_path", &interpolate_path_cpu);
  m.impl("interpolate_path_into", &interpolate_path_into_cpu);
}

}  // namespace igfast::cpu
