// The switch of launch_overlapped (common/qmamba_common.cuh): whether qmamba's kernels are launched overlapped with
// the kernel before them (programmatic dependent launch, sm_90+; on by default). benchmarks/latency.py turns it off to
// measure what it brings in the same run. Launches read it when they are made: a CUDA graph keeps what it captured.
#include "common/qmamba_common.cuh"

namespace qmamba {
namespace {

bool set_launch_overlap(bool enabled) {
  const bool previous = launch_overlap;
  launch_overlap = enabled;
  return previous;
}

}  // namespace
}  // namespace qmamba

TORCH_LIBRARY_FRAGMENT(qmamba, m) { m.def("set_launch_overlap(bool enabled) -> bool"); }

TORCH_LIBRARY_IMPL(qmamba, CompositeExplicitAutograd, m) { m.impl("set_launch_overlap", &qmamba::set_launch_overlap); }
