// The one place that says what the igfast ops are: every schema of the
// `igfast` namespace is defined here, with the checks all backends share;
// backends register their kernels in their own translation units (csrc/cpu,
// csrc/cuda). Shapes: inputs x (B, ...), baselines x' (B or 1, ...), alphas
// (n,), a chunk of steps [step_begin, step_end) gives k = step_end - step_begin
// path rows per example, laid out step-major: row s * B + i.
#include <Python.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "igfast.h"

// Importing igfast._C from Python loads this library, which runs the
// TORCH_LIBRARY registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace igfast {

// Bumped whenever an op schema changes, so Python can refuse a stale build.
int64_t abi_version() { return 6; }

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "igfast: `", name,
              "` must be float16, bfloat16, float32 or float64; got ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "igfast: `", a_name, "` (on ", a.device(), ") and `",
              b_name, "` (on ", b.device(), ") must be on the same device");
}

void check_feature_shapes(const at::Tensor& t, const char* name, const at::Tensor& reference,
                          const char* reference_name) {
  TORCH_CHECK(t.dim() == reference.dim() && t.sizes().slice(1) == reference.sizes().slice(1),
              "igfast: `", name, "` must have the feature shape of `", reference_name,
              "` (all dimensions after the first); got ", t.sizes(), " and ", reference.sizes());
}

void check_interpolate_path(const at::Tensor& inputs, const at::Tensor& baselines,
                            const at::Tensor& alphas, int64_t step_begin, int64_t step_end) {
  check_float(inputs, "inputs");
  TORCH_CHECK(inputs.dim() >= 1, "igfast: `inputs` needs a batch dimension; got a 0-dim tensor");
  TORCH_CHECK(baselines.scalar_type() == inputs.scalar_type(), "igfast: `baselines` must have the dtype of `inputs` (",
              inputs.scalar_type(), "); got ", baselines.scalar_type());
  check_feature_shapes(baselines, "baselines", inputs, "inputs");
  TORCH_CHECK(baselines.size(0) == 1 || baselines.size(0) == inputs.size(0),
              "igfast: `baselines` must have 1 or ", inputs.size(0), " rows; got ", baselines.size(0));
  TORCH_CHECK(alphas.dim() == 1, "igfast: `alphas` must be 1-D; got shape ", alphas.sizes());
  TORCH_CHECK(at::isFloatingType(alphas.scalar_type()), "igfast: `alphas` must be floating point; got ",
              alphas.scalar_type());
  TORCH_CHECK(0 <= step_begin && step_begin <= step_end && step_end <= alphas.size(0),
              "igfast: the chunk [step_begin, step_end) = [", step_begin, ", ", step_end,
              ") must lie within the ", alphas.size(0), " alphas");
  check_same_device(baselines, "baselines", inputs, "inputs");
  check_same_device(alphas, "alphas", inputs, "inputs");
}

void check_accumulate_steps(const at::Tensor& accumulator, const at::Tensor& grads,
                            const at::Tensor& weights) {
  check_float(grads, "grads");
  TORCH_CHECK(accumulator.scalar_type() == accumulate_dtype(grads.scalar_type()),
              "igfast: `accumulator` must be ", accumulate_dtype(grads.scalar_type()), " for ",
              grads.scalar_type(), " grads; got ", accumulator.scalar_type());
  TORCH_CHECK(accumulator.dim() >= 1, "igfast: `accumulator` needs a batch dimension");
  TORCH_CHECK(accumulator.is_contiguous(), "igfast: `accumulator` must be contiguous (it is written in place)");
  check_feature_shapes(grads, "grads", accumulator, "accumulator");
  TORCH_CHECK(weights.dim() == 1, "igfast: `weights` must be 1-D; got shape ", weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), "igfast: `weights` must be floating point; got ",
              weights.scalar_type());
  TORCH_CHECK(grads.size(0) == weights.size(0) * accumulator.size(0), "igfast: `grads` must have ",
              weights.size(0), " steps x ", accumulator.size(0), " examples = ",
              weights.size(0) * accumulator.size(0), " rows; got ", grads.size(0));
  check_same_device(grads, "grads", accumulator, "accumulator");
  check_same_device(weights, "weights", accumulator, "accumulator");
}

void check_scale_by_difference(const at::Tensor& accumulator, const at::Tensor& inputs,
                               const at::Tensor& baselines) {
  check_float(inputs, "inputs");
  TORCH_CHECK(inputs.dim() >= 1, "igfast: `inputs` needs a batch dimension; got a 0-dim tensor");
  TORCH_CHECK(accumulator.scalar_type() == accumulate_dtype(inputs.scalar_type()),
              "igfast: `accumulator` must be ", accumulate_dtype(inputs.scalar_type()), " for ",
              inputs.scalar_type(), " inputs; got ", accumulator.scalar_type());
  TORCH_CHECK(accumulator.sizes() == inputs.sizes(), "igfast: `accumulator` must have the shape of `inputs` ",
              inputs.sizes(), "; got ", accumulator.sizes());
  TORCH_CHECK(baselines.scalar_type() == inputs.scalar_type(), "igfast: `baselines` must have the dtype of `inputs`");
  check_feature_shapes(baselines, "baselines", inputs, "inputs");
  TORCH_CHECK(baselines.size(0) == 1 || baselines.size(0) == inputs.size(0),
              "igfast: `baselines` must have 1 or ", inputs.size(0), " rows; got ", baselines.size(0));
  check_same_device(accumulator, "accumulator", inputs, "inputs");
  check_same_device(baselines, "baselines", inputs, "inputs");
}

void check_scalar_kinks(const at::Tensor& primal, const at::Tensor& tangent, int64_t rows,
                        const std::optional<at::Tensor>& low, const std::optional<at::Tensor>& high) {
  check_float(primal, "primal");
  TORCH_CHECK(tangent.scalar_type() == primal.scalar_type() && tangent.sizes() == primal.sizes(),
              "igfast: `tangent` must have the dtype and shape of `primal` (", primal.scalar_type(), ", ",
              primal.sizes(), "); got ", tangent.scalar_type(), ", ", tangent.sizes());
  check_same_device(tangent, "tangent", primal, "primal");
  TORCH_CHECK(rows >= 1 && primal.dim() >= 1 && primal.size(0) % rows == 0, "igfast: `rows` (", rows,
              ") must be positive and divide the first dimension of `primal` (shape ", primal.sizes(), ")");
  TORCH_CHECK(low.has_value() == high.has_value(), "igfast: give both ends of the window (`low` and `high`) or neither");
  if (!low.has_value()) return;
  for (const auto* end : {&*low, &*high}) {
    TORCH_CHECK(end->scalar_type() == at::kDouble && end->dim() == 1 && end->size(0) == rows,
                "igfast: the window's ends (`low`, `high`) must be float64 of shape (", rows, "); got ",
                end->scalar_type(), " of shape ", end->sizes());
    check_same_device(*end, "low / high", primal, "primal");
  }
}

}  // namespace

at::ScalarType compute_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType accumulate_dtype(at::ScalarType input_dtype) {
  return compute_dtype(input_dtype);
}

InterpolationPlan plan_interpolate_path(const at::Tensor& inputs, const at::Tensor& baselines,
                                        const at::Tensor& alphas, int64_t step_begin, int64_t step_end,
                                        const at::Tensor& out) {
  check_interpolate_path(inputs, baselines, alphas, step_begin, step_end);
  InterpolationPlan plan;
  // Non-contiguous tensors are handled here, at the boundary, by one copy.
  plan.inputs = inputs.contiguous();
  plan.baselines = baselines.contiguous();
  plan.alphas = alphas.slice(0, step_begin, step_end).to(compute_dtype(inputs.scalar_type())).contiguous();
  plan.steps = step_end - step_begin;
  plan.batch = inputs.size(0);
  plan.features = features_per_example(inputs);
  plan.broadcast_baseline = baselines.size(0) == 1;
  std::vector<int64_t> shape = inputs.sizes().vec();
  shape[0] = plan.steps * plan.batch;
  if (!out.defined()) {
    plan.path = at::empty(shape, inputs.options());
    return plan;
  }
  // The engine reuses one buffer for every chunk, so the kernels write into it
  // directly; it must be exactly the output interpolate_path would allocate.
  TORCH_CHECK(out.scalar_type() == inputs.scalar_type(), "igfast: `out` must have the dtype of `inputs` (",
              inputs.scalar_type(), "); got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), "igfast: `out` must have shape ", at::IntArrayRef(shape),
              " (steps x examples rows); got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "igfast: `out` must be contiguous");
  check_same_device(out, "out", inputs, "inputs");
  plan.path = out;
  return plan;
}

AccumulationPlan plan_accumulate_steps(const at::Tensor& accumulator, const at::Tensor& grads,
                                       const at::Tensor& weights) {
  check_accumulate_steps(accumulator, grads, weights);
  return {grads.contiguous(), weights.to(accumulator.scalar_type()).contiguous(), weights.size(0),
          accumulator.numel()};
}

ScalingPlan plan_scale_by_difference(const at::Tensor& accumulator, const at::Tensor& inputs,
                                     const at::Tensor& baselines) {
  check_scale_by_difference(accumulator, inputs, baselines);
  ScalingPlan plan;
  plan.accumulator = accumulator.contiguous();
  plan.inputs = inputs.contiguous();
  plan.baselines = baselines.contiguous();
  plan.out = at::empty_like(plan.accumulator, at::MemoryFormat::Contiguous);
  plan.batch = inputs.size(0);
  plan.features = features_per_example(inputs);
  plan.broadcast_baseline = baselines.size(0) == 1;
  return plan;
}

OvertakingsPlan plan_overtakings(const at::Tensor& values, const at::Tensor& rates, const at::Tensor& winner_values,
                                 const at::Tensor& winner_rates) {
  const std::pair<const at::Tensor*, const char*> named[] = {
      {&values, "values"}, {&rates, "rates"}, {&winner_values, "winner_values"}, {&winner_rates, "winner_rates"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK(t->scalar_type() == at::kDouble, "igfast: `", name, "` must be float64; got ", t->scalar_type());
    check_same_device(*t, name, values, "values");
  }
  TORCH_CHECK(values.dim() >= 1 && rates.sizes() == values.sizes(), "igfast: `rates` must have the shape of `values` (",
              values.sizes(), "), the windows' elements first; got ", rates.sizes());
  TORCH_CHECK(winner_values.sizes() == values.sizes().slice(1) && winner_rates.sizes() == winner_values.sizes(),
              "igfast: `winner_values` and `winner_rates` must have the shape of `values` without its first "
              "dimension (", values.sizes().slice(1), "); got ", winner_values.sizes(), " and ", winner_rates.sizes());
  OvertakingsPlan plan;
  plan.values = values.contiguous();
  plan.rates = rates.contiguous();
  plan.winner_values = winner_values.contiguous();
  plan.winner_rates = winner_rates.contiguous();
  plan.elements = values.size(0);
  plan.windows = winner_values.numel();
  return plan;
}

CutPlan plan_cut_at_kinks(const at::Tensor& low, const at::Tensor& high, const at::Tensor& middle,
                          const at::Tensor& piece_start, const at::Tensor& piece_end, const at::Tensor& kink_rows,
                          const at::Tensor& kink_steps) {
  const std::pair<const at::Tensor*, const char*> per_segment[] = {
      {&low, "low"}, {&high, "high"}, {&middle, "middle"}, {&piece_start, "piece_start"}, {&piece_end, "piece_end"}};
  for (const auto& [t, name] : per_segment) {
    TORCH_CHECK(t->scalar_type() == at::kDouble, "igfast: `", name, "` must be float64; got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == low.numel(), "igfast: `", name,
                "` must be 1-D with one value per segment (", low.numel(), "); got shape ", t->sizes());
    check_same_device(*t, name, low, "low");
  }
  TORCH_CHECK(kink_rows.scalar_type() == at::kLong, "igfast: `kink_rows` must be int64; got ", kink_rows.scalar_type());
  TORCH_CHECK(kink_steps.scalar_type() == at::kDouble, "igfast: `kink_steps` must be float64; got ",
              kink_steps.scalar_type());
  TORCH_CHECK(kink_rows.dim() == 1 && kink_steps.dim() == 1 && kink_rows.numel() == kink_steps.numel(),
              "igfast: `kink_rows` and `kink_steps` must be 1-D of one length (one per kink); got shapes ",
              kink_rows.sizes(), " and ", kink_steps.sizes());
  check_same_device(kink_rows, "kink_rows", low, "low");
  check_same_device(kink_steps, "kink_steps", low, "low");
  CutPlan plan;
  plan.low = low.contiguous();
  plan.high = high.contiguous();
  plan.middle = middle.contiguous();
  plan.piece_start = piece_start.contiguous();
  plan.piece_end = piece_end.contiguous();
  plan.kink_rows = kink_rows.contiguous();
  plan.kink_steps = kink_steps.contiguous();
  plan.segments = low.numel();
  plan.kinks = kink_rows.numel();
  return plan;
}

ScalarKinksPlan plan_scalar_kinks(const at::Tensor& primal, const at::Tensor& tangent, int64_t rows,
                                  const std::optional<at::Tensor>& low, const std::optional<at::Tensor>& high) {
  check_scalar_kinks(primal, tangent, rows, low, high);
  ScalarKinksPlan plan;
  plan.primal = primal.contiguous();  // (rows, units) in the tensor's logical order, as reshape reads it
  plan.tangent = tangent.contiguous();
  plan.rows = rows;
  plan.units = primal.numel() / rows;
  plan.with_window = low.has_value();
  if (plan.with_window) {
    plan.low = low->contiguous();
    plan.high = high->contiguous();
  }
  return plan;
}

TORCH_LIBRARY(igfast, m) {
  m.def("abi_version() -> int", &abi_version);
  // The path points of steps [step_begin, step_end): (k * B, ...) step-major.
  m.def("interpolate_path(Tensor inputs, Tensor baselines, Tensor alphas, int step_begin, int step_end) -> Tensor");
  // The same path points written into `out`, a buffer the caller reuses across chunks.
  m.def("interpolate_path_into(Tensor(a!) out, Tensor inputs, Tensor baselines, Tensor alphas, int step_begin, "
        "int step_end) -> ()");
  // accumulator += sum_k weights[k] * grads[k] in place (accumulate dtype).
  m.def("accumulate_steps(Tensor(a!) accumulator, Tensor grads, Tensor weights) -> ()");
  // accumulator * (inputs - baselines): the attributions when multiplying by inputs.
  m.def("scale_by_difference(Tensor accumulator, Tensor inputs, Tensor baselines) -> Tensor");
  // The walk of method="exact" at one op whose units each have one kink at `kink`
  // (igfast/reference.py: scalar_kinks): (factor, tangent * factor, found kinks' rows,
  // their steps, nearest ahead, nearest behind, near); the last five empty without a window.
  m.def("scalar_kinks(Tensor primal, Tensor tangent, float kink, float margin, int rows, Tensor? low, "
        "Tensor? high, float below, float at, float above) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same at a max-pool, per window (igfast/reference.py: overtakings): (..., 3) signed
  // steps (nearest overtaking ahead, behind, 0 for a tie) from (elements, ...) float64
  // values and rates with the windows' elements first, and the winners' (...).
  m.def("overtakings(Tensor values, Tensor rates, Tensor winner_values, Tensor winner_rates, float margin) -> Tensor");
  // The walk's segments cut at the piece around their middle and at their kinks
  // (igfast/reference.py: cut_at_kinks): (segment, part_low, part_high, holds_point).
  m.def("cut_at_kinks(Tensor low, Tensor high, Tensor middle, Tensor piece_start, Tensor piece_end, "
        "Tensor kink_rows, Tensor kink_steps, float margin) -> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace igfast
