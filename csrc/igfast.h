// Shared declarations of the igfast ops: the dtype rules (mirroring
// igfast/dtypes.py) and, per op, a plan that checks the arguments and prepares
// them for every backend's kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace igfast {

int64_t abi_version();

// dtype of alpha * (x - x'): PyTorch's opmath (float for half types).
at::ScalarType compute_dtype(at::ScalarType input_dtype);
// dtype of the weighted sum over steps: float for half types, else the input dtype.
at::ScalarType accumulate_dtype(at::ScalarType input_dtype);

// The arguments of interpolate_path after the checks, made contiguous, with the
// chunk's alphas in the compute dtype and the output allocated (or, for
// interpolate_path_into, the caller's buffer checked): what every backend's
// kernel needs, prepared in one place.
struct InterpolationPlan {
  at::Tensor inputs;
  at::Tensor baselines;
  at::Tensor alphas;
  at::Tensor path;
  int64_t steps;
  int64_t batch;
  int64_t features;
  bool broadcast_baseline;
};
InterpolationPlan plan_interpolate_path(const at::Tensor& inputs, const at::Tensor& baselines,
                                        const at::Tensor& alphas, int64_t step_begin, int64_t step_end,
                                        const at::Tensor& out = at::Tensor());

// The arguments of accumulate_steps after the checks: contiguous grads and the
// weights in the accumulator's dtype.
struct AccumulationPlan {
  at::Tensor grads;
  at::Tensor weights;
  int64_t steps;
  int64_t elements;
};
AccumulationPlan plan_accumulate_steps(const at::Tensor& accumulator, const at::Tensor& grads,
                                       const at::Tensor& weights);

// The arguments of scale_by_difference after the checks, made contiguous, with
// the output allocated.
struct ScalingPlan {
  at::Tensor accumulator;
  at::Tensor inputs;
  at::Tensor baselines;
  at::Tensor out;
  int64_t batch;
  int64_t features;
  bool broadcast_baseline;
};
ScalingPlan plan_scale_by_difference(const at::Tensor& accumulator, const at::Tensor& inputs,
                                     const at::Tensor& baselines);

// The arguments of scalar_kinks after the checks: primal and tangent contiguous,
// (rows, units) of them; the window (low, high) float64 contiguous, when given.
struct ScalarKinksPlan {
  at::Tensor primal;
  at::Tensor tangent;
  at::Tensor low;
  at::Tensor high;
  int64_t rows;
  int64_t units;
  bool with_window;
};
ScalarKinksPlan plan_scalar_kinks(const at::Tensor& primal, const at::Tensor& tangent, int64_t rows,
                                  const std::optional<at::Tensor>& low, const std::optional<at::Tensor>& high);

// The arguments of overtakings after the checks, contiguous: (elements, windows) of
// values and rates, (windows) of the winners'.
struct OvertakingsPlan {
  at::Tensor values;
  at::Tensor rates;
  at::Tensor winner_values;
  at::Tensor winner_rates;
  int64_t elements;
  int64_t windows;
};
OvertakingsPlan plan_overtakings(const at::Tensor& values, const at::Tensor& rates, const at::Tensor& winner_values,
                                 const at::Tensor& winner_rates);

// The arguments of cut_at_kinks after the checks, contiguous: (segments) float64 of
// low, high, middle, piece_start and piece_end, (kinks) of kink_rows (int64) and
// kink_steps (float64).
struct CutPlan {
  at::Tensor low;
  at::Tensor high;
  at::Tensor middle;
  at::Tensor piece_start;
  at::Tensor piece_end;
  at::Tensor kink_rows;
  at::Tensor kink_steps;
  int64_t segments;
  int64_t kinks;
};
CutPlan plan_cut_at_kinks(const at::Tensor& low, const at::Tensor& high, const at::Tensor& middle,
                          const at::Tensor& piece_start, const at::Tensor& piece_end, const at::Tensor& kink_rows,
                          const at::Tensor& kink_steps);

// Number of feature elements per example (product of all but the first dimension).
inline int64_t features_per_example(const at::Tensor& t) {
  return t.dim() == 0 ? 1 : (t.size(0) == 0 ? t.numel() : t.numel() / t.size(0));
}

}  // namespace igfast
