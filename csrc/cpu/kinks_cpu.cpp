// CPU kernels of igfast::scalar_kinks, igfast::overtakings (a max-pool's windows) and
// igfast::cut_at_kinks (the walk's cut of segments into parts), the last two at the end
// of this file. scalar_kinks: the walk of method="exact" at an op whose
// units each have one kink at a fixed value (ReLU, LeakyReLU, PReLU, abs), in one
// pass over the units where the pure-PyTorch path (igfast/reference.py) makes
// about fifteen over float64 copies of them (on igfast bench's MLP those passes
// were a third of the walk's time).
//
// Per unit, in float64 as the reference: the side of its kink just after the
// point (z + margin dz against the kink, with the fused multiply-add that
// PyTorch's vectorised add with alpha uses), which picks the op's factor (the
// tangent is scaled here too: the walk's tangents carry no autograd graph), and
// its signed step (kink - z) / dz;
// per row, whether a unit is on its kink at the point, and the kinks inside the
// window. Tasks own whole rows: a first pass counts each row's kinks, a second
// writes them at offsets from the counts' prefix sum, so the list comes out
// row-major, in the order of the reference's nonzero(). Each pass over a row is a
// loop without branches (row_loops.h's multiversioning vectorises it, and makes
// std::fma one instruction): a comparison that decides a branch is a coin toss
// for half the units, and branching on it cost 10 ns a unit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/row_loops.h"
#include "igfast.h"

namespace igfast::cpu {
namespace {

using Kinks = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr double kInf = std::numeric_limits<double>::infinity();

// The op's factor for the side of its kink each unit is on just after the point (z +
// margin dz against kink: below, at or above it), and the tangent times it.
template <typename scalar_t>
IGFAST_ROW_LOOP void factor_row(scalar_t* __restrict factor, scalar_t* __restrict scaled_tangent,
                                const scalar_t* __restrict z, const scalar_t* __restrict dz, double kink,
                                double margin, scalar_t below, scalar_t at_kink, scalar_t above, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    const double side = std::fma(static_cast<double>(dz[j]), margin, static_cast<double>(z[j]));
    const scalar_t f = side > kink ? above : (side < kink ? below : at_kink);
    factor[j] = f;
    scaled_tangent[j] = static_cast<scalar_t>(static_cast<opmath_t>(dz[j]) * static_cast<opmath_t>(f));
  }
}

// steps = (kink - z) / dz. (The reference negates z for a kink at 0: -0 and +0 differ
// only in the sign of a zero step, which is on its kink, never recorded.)
template <typename scalar_t>
IGFAST_ROW_LOOP void step_row(double* __restrict steps, const scalar_t* __restrict z, const scalar_t* __restrict dz,
                              double kink, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    steps[j] = (kink - static_cast<double>(z[j])) / static_cast<double>(dz[j]);
  }
}

// A step off its kink (|step| > margin; nan is not) inside (from, to).
inline int64_t inside(double step, double margin, double from, double to) {
  return static_cast<int64_t>(std::fabs(step) > margin) & static_cast<int64_t>(step > from) &
         static_cast<int64_t>(step < to);
}

// The row's kinks inside (from, to); *on_kink: how many units are on their kink (|step| <=
// margin; nan is not: a unit at its kink with no rate stays on it, which cuts nothing).
IGFAST_ROW_LOOP int64_t count_row(const double* __restrict steps, double margin, double from, double to, int64_t n,
                                  int64_t* __restrict on_kink) {
  int64_t found = 0, on = 0;
  for (int64_t j = 0; j < n; ++j) {
    on += static_cast<int64_t>(std::fabs(steps[j]) <= margin);
    found += inside(steps[j], margin, from, to);
  }
  *on_kink = on;
  return found;
}

// The row's kinks inside (from, to), in unit order, into found (room for n + 1: every
// step is written and only a kink's advances).
IGFAST_ROW_LOOP void compact_row(double* __restrict found, const double* __restrict steps, double margin, double from,
                                 double to, int64_t n) {
  int64_t at = 0;
  for (int64_t j = 0; j < n; ++j) {
    found[at] = steps[j];
    at += inside(steps[j], margin, from, to);
  }
}

Kinks scalar_kinks_cpu(const at::Tensor& primal_in, const at::Tensor& tangent_in, double kink, double margin,
                       int64_t rows, const std::optional<at::Tensor>& low_in,
                       const std::optional<at::Tensor>& high_in, double below, double at_kink, double above) {
  const ScalarKinksPlan plan = plan_scalar_kinks(primal_in, tangent_in, rows, low_in, high_in);
  const int64_t units = plan.units;
  const bool with_window = plan.with_window;
  const auto doubles = plan.primal.options().dtype(at::kDouble);
  at::Tensor factor = at::empty_like(plan.primal);
  at::Tensor scaled_tangent = at::empty_like(plan.primal);
  at::Tensor ahead = at::empty({with_window ? rows : 0}, doubles);
  at::Tensor behind = at::empty({with_window ? rows : 0}, doubles);
  at::Tensor near = at::empty({with_window ? rows : 0}, doubles.dtype(at::kBool));
  std::vector<int64_t> counts(with_window ? rows : 0, 0);
  const int64_t grain = grain_for(units);
  const double* low = with_window ? plan.low.const_data_ptr<double>() : nullptr;
  const double* high = with_window ? plan.high.const_data_ptr<double>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.primal.scalar_type(), "scalar_kinks_cpu", [&] {
    const scalar_t* z = plan.primal.const_data_ptr<scalar_t>();
    const scalar_t* dz = plan.tangent.const_data_ptr<scalar_t>();
    scalar_t* factor_out = factor.mutable_data_ptr<scalar_t>();
    scalar_t* tangent_out = scaled_tangent.mutable_data_ptr<scalar_t>();
    const auto below_factor = static_cast<scalar_t>(below), at_factor = static_cast<scalar_t>(at_kink),
               above_factor = static_cast<scalar_t>(above);
    bool* on_kink = with_window ? near.mutable_data_ptr<bool>() : nullptr;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      double* steps = scratch_buffer<double, 3>(units);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t offset = row * units;
        factor_row(factor_out + offset, tangent_out + offset, z + offset, dz + offset, kink, margin, below_factor,
                   at_factor, above_factor, units);
        if (!with_window) continue;
        step_row(steps, z + offset, dz + offset, kink, units);
        int64_t on = 0;
        counts[row] = count_row(steps, margin, low[row] + margin, high[row] - margin, units, &on);
        on_kink[row] = on > 0;
      }
    });
  });
  if (!with_window) {
    return {factor, scaled_tangent, at::empty({0}, doubles.dtype(at::kLong)), at::empty({0}, doubles), ahead, behind,
            near};
  }

  std::vector<int64_t> first(rows + 1, 0);  // where each row's kinks begin in the list
  for (int64_t row = 0; row < rows; ++row) first[row + 1] = first[row] + counts[row];
  at::Tensor kink_rows = at::empty({first[rows]}, doubles.dtype(at::kLong));
  at::Tensor kink_steps = at::empty({first[rows]}, doubles);
  int64_t* rows_out = kink_rows.mutable_data_ptr<int64_t>();
  double* steps_out = kink_steps.mutable_data_ptr<double>();
  double* nearest_ahead = ahead.mutable_data_ptr<double>();
  double* nearest_behind = behind.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.primal.scalar_type(), "scalar_kinks_cpu_list", [&] {
    const scalar_t* z = plan.primal.const_data_ptr<scalar_t>();
    const scalar_t* dz = plan.tangent.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      double* steps = scratch_buffer<double, 3>(units);
      double* found = scratch_buffer<double, 4>(units + 1);
      for (int64_t row = begin; row < end; ++row) {
        double row_ahead = kInf, row_behind = -kInf;
        const int64_t count = counts[row];
        if (count > 0) {
          step_row(steps, z + row * units, dz + row * units, kink, units);
          compact_row(found, steps, margin, low[row] + margin, high[row] - margin, units);
          for (int64_t k = 0; k < count; ++k) {
            const double step = found[k];
            rows_out[first[row] + k] = row;
            steps_out[first[row] + k] = step;
            row_ahead = std::min(row_ahead, step > 0 ? step : kInf);
            row_behind = std::max(row_behind, step < 0 ? step : -kInf);
          }
        }
        nearest_ahead[row] = row_ahead;
        nearest_behind[row] = row_behind;
      }
    });
  });
  return {factor, scaled_tangent, kink_rows, kink_steps, ahead, behind, near};
}

// One element of every window against its winner (rate: how fast it gains on it):
// the nearest overtaking ahead and behind so far, and whether one is level with it.
IGFAST_ROW_LOOP void overtaking_row(double* __restrict ahead, double* __restrict behind, uint8_t* __restrict tied,
                                    const double* __restrict values, const double* __restrict rates,
                                    const double* __restrict winner_values, const double* __restrict winner_rates,
                                    double margin, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const double rate = rates[j] - winner_rates[j];
    const double step = (winner_values[j] - values[j]) / rate;
    ahead[j] = (rate > 0) & (step > margin) & (step < ahead[j]) ? step : ahead[j];
    behind[j] = (rate < 0) & (step < -margin) & (step > behind[j]) ? step : behind[j];
    tied[j] |= static_cast<uint8_t>(std::fabs(step) <= margin);  // (nan: the winner itself, never)
  }
}

at::Tensor overtakings_cpu(const at::Tensor& values_in, const at::Tensor& rates_in, const at::Tensor& winner_values_in,
                           const at::Tensor& winner_rates_in, double margin) {
  const OvertakingsPlan plan = plan_overtakings(values_in, rates_in, winner_values_in, winner_rates_in);
  const int64_t elements = plan.elements, windows = plan.windows;
  std::vector<int64_t> shape = plan.winner_values.sizes().vec();
  shape.push_back(3);
  at::Tensor signed_steps = at::empty(shape, plan.values.options());
  const double* values = plan.values.const_data_ptr<double>();
  const double* rates = plan.rates.const_data_ptr<double>();
  const double* winner_values = plan.winner_values.const_data_ptr<double>();
  const double* winner_rates = plan.winner_rates.const_data_ptr<double>();
  double* out = signed_steps.mutable_data_ptr<double>();
  // Tasks own blocks of windows; each block's running results stay in cache while the
  // windows' elements stream past, one row of the windows-first layout at a time.
  at::parallel_for(0, windows, std::max<int64_t>(kFeatureBlock, grain_for(elements)), [&](int64_t begin, int64_t end) {
    double* ahead = scratch_buffer<double, 5>(kFeatureBlock);
    double* behind = scratch_buffer<double, 6>(kFeatureBlock);
    uint8_t* tied = scratch_buffer<uint8_t, 7>(kFeatureBlock);
    for (int64_t j0 = begin; j0 < end; j0 += kFeatureBlock) {
      const int64_t n = std::min(kFeatureBlock, end - j0);
      std::fill(ahead, ahead + n, kInf);
      std::fill(behind, behind + n, -kInf);
      std::fill(tied, tied + n, uint8_t{0});
      for (int64_t element = 0; element < elements; ++element) {
        overtaking_row(ahead, behind, tied, values + element * windows + j0, rates + element * windows + j0,
                       winner_values + j0, winner_rates + j0, margin, n);
      }
      for (int64_t j = 0; j < n; ++j) {
        out[3 * (j0 + j)] = ahead[j];
        out[3 * (j0 + j) + 1] = std::isfinite(behind[j]) ? behind[j] : kInf;
        out[3 * (j0 + j) + 2] = tied[j] ? 0.0 : kInf;
      }
    }
  });
  return signed_steps;
}

// cut_at_kinks: the reference concatenates every cut (each segment's ends, its piece's
// ends, then the kinks) and sorts them twice over, stably by place then by segment. A
// segment holds a few cuts, so here they are bucketed by segment in that concatenated
// order (a counting sort) and each bucket is sorted by place on its own (stably: a tie
// keeps the concatenated order, as in the reference).

// a before b in PyTorch's ascending sort of floats: NaN after everything.
inline bool sorts_before(double a, double b) { return a < b || (!std::isnan(a) && std::isnan(b)); }

void stable_sort_places(double* begin, double* end) {
  if (end - begin <= 32) {  // insertion sort: most buckets hold 4 to 8 cuts
    for (double* i = begin + 1; i < end; ++i) {
      const double value = *i;
      double* j = i;
      for (; j > begin && sorts_before(value, *(j - 1)); --j) *j = *(j - 1);
      *j = value;
    }
  } else {
    std::stable_sort(begin, end, sorts_before);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cut_at_kinks_cpu(
    const at::Tensor& low_in, const at::Tensor& high_in, const at::Tensor& middle_in, const at::Tensor& piece_start_in,
    const at::Tensor& piece_end_in, const at::Tensor& kink_rows_in, const at::Tensor& kink_steps_in, double margin) {
  const CutPlan plan =
      plan_cut_at_kinks(low_in, high_in, middle_in, piece_start_in, piece_end_in, kink_rows_in, kink_steps_in);
  const int64_t segments = plan.segments, kinks = plan.kinks;
  const double* low = plan.low.const_data_ptr<double>();
  const double* high = plan.high.const_data_ptr<double>();
  const double* middle = plan.middle.const_data_ptr<double>();
  const double* piece_start = plan.piece_start.const_data_ptr<double>();
  const double* piece_end = plan.piece_end.const_data_ptr<double>();
  const int64_t* kink_rows = plan.kink_rows.const_data_ptr<int64_t>();
  const double* kink_steps = plan.kink_steps.const_data_ptr<double>();
  constexpr int64_t kEnds = 4;  // low, high, piece_start, piece_end
  // bucket[i] .. bucket[i + 1]: segment i's cuts.
  std::vector<int64_t> bucket(segments + 1, 0);
  for (int64_t k = 0; k < kinks; ++k) {
    const int64_t row = kink_rows[k];
    TORCH_CHECK(row >= 0 && row < segments, "igfast: `kink_rows` must index the segments [0, ", segments, "); got ",
                row);
    ++bucket[row + 1];
  }
  for (int64_t i = 0; i < segments; ++i) bucket[i + 1] += bucket[i] + kEnds;
  std::vector<double> place(bucket[segments]);
  std::vector<int64_t> filled(segments);
  for (int64_t i = 0; i < segments; ++i) {
    double* cuts = place.data() + bucket[i];
    cuts[0] = low[i];
    cuts[1] = high[i];
    cuts[2] = piece_start[i];
    cuts[3] = piece_end[i];
    filled[i] = bucket[i] + kEnds;
  }
  for (int64_t k = 0; k < kinks; ++k) {
    const int64_t row = kink_rows[k];
    place[filled[row]++] = middle[row] + kink_steps[k];
  }
  // A cut within the margin of the one before it (sorted) is the same cut; a part lies
  // between consecutive distinct cuts of a segment. Counted first, then written.
  int64_t parts = 0;
  for (int64_t i = 0; i < segments; ++i) {
    double* cuts = place.data() + bucket[i];
    const int64_t count = bucket[i + 1] - bucket[i];
    stable_sort_places(cuts, cuts + count);
    for (int64_t j = 1; j < count; ++j) parts += (cuts[j] - cuts[j - 1] > margin);
  }
  at::Tensor part_segment = at::empty({parts}, plan.kink_rows.options());
  at::Tensor part_low = at::empty({parts}, plan.low.options());
  at::Tensor part_high = at::empty({parts}, plan.low.options());
  at::Tensor holds = at::empty({parts}, plan.low.options().dtype(at::kBool));
  int64_t* out_segment = part_segment.mutable_data_ptr<int64_t>();
  double* out_low = part_low.mutable_data_ptr<double>();
  double* out_high = part_high.mutable_data_ptr<double>();
  bool* out_holds = holds.mutable_data_ptr<bool>();
  int64_t part = 0;
  for (int64_t i = 0; i < segments; ++i) {
    const double* cuts = place.data() + bucket[i];
    const int64_t count = bucket[i + 1] - bucket[i];
    double start = cuts[0];
    for (int64_t j = 1; j < count; ++j) {
      if (!(cuts[j] - cuts[j - 1] > margin)) continue;
      out_segment[part] = i;
      out_low[part] = start;
      out_high[part] = cuts[j];
      out_holds[part] = start <= middle[i] && middle[i] < cuts[j];
      start = cuts[j];
      ++part;
    }
  }
  return {part_segment, part_low, part_high, holds};
}

}  // namespace

TORCH_LIBRARY_IMPL(igfast, CPU, m) {
  m.impl("scalar_kinks", &scalar_kinks_cpu);
  m.impl("overtakings", &overtakings_cpu);
  m.impl("cut_at_kinks", &cut_at_kinks_cpu);
}

}  // namespace igfast::cpu
