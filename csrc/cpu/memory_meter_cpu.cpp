// A peak meter for CPU memory, which PyTorch does not track on its own (there
// is no CPU counterpart of torch.cuda.max_memory_allocated).
//
// PyTorch's default CPU allocator reports every allocation and free to the
// MemoryReportingInfoBase found in the thread-local debug info, the hook the
// profiler's memory view uses. While the meter runs it is that hook: it sums the
// bytes allocated on this thread (and on the threads that inherit its state,
// such as the autograd engine's) and keeps the highest sum; meters nest. The
// profiler uses the same slot, so while it runs the meter stands aside. Frees of blocks allocated before the start
// are not reported, so the figure is the peak of the memory allocated while the
// meter ran, above what was already there.
#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "igfast.h"

namespace igfast {
namespace {

struct PeakMeter final : c10::MemoryReportingInfoBase {
  // The meter this one nests in: every report is passed on to it.
  PeakMeter* parent = nullptr;
  std::atomic<int64_t> current{0};
  std::atomic<int64_t> peak{0};

  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t total_allocated, size_t total_reserved,
                         c10::Device device) override {
    if (parent != nullptr) parent->reportMemoryUsage(ptr, alloc_size, total_allocated, total_reserved, device);
    if (!device.is_cpu()) return;
    const int64_t now = current.fetch_add(alloc_size) + alloc_size;
    int64_t seen = peak.load();
    while (now > seen && !peak.compare_exchange_weak(seen, now)) {
    }
  }

  bool memoryProfilingEnabled() const override { return true; }
};

struct ActiveMeter {
  std::shared_ptr<PeakMeter> meter;
  std::unique_ptr<c10::DebugInfoGuard> guard;
};

// Meters nest: the innermost is on top.
thread_local std::vector<ActiveMeter> active_meters;

}  // namespace

bool cpu_memory_meter_start() {
  c10::DebugInfoBase* holder = c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE);
  auto* parent = dynamic_cast<PeakMeter*>(holder);
  // The profiler keeps its own state in this slot and reads it back as its own
  // type: while it runs the slot is not ours to take, and nothing is measured.
  if (holder != nullptr && parent == nullptr) return false;
  auto meter = std::make_shared<PeakMeter>();
  meter->parent = parent;
  auto guard = std::make_unique<c10::DebugInfoGuard>(c10::DebugInfoKind::PROFILER_STATE, meter);
  active_meters.push_back({std::move(meter), std::move(guard)});
  return true;
}

int64_t cpu_memory_meter_stop() {
  TORCH_CHECK(!active_meters.empty(), "igfast: no CPU memory meter is running on this thread");
  ActiveMeter top = std::move(active_meters.back());
  active_meters.pop_back();
  top.guard.reset();
  return top.meter->peak.load();
}

}  // namespace igfast
