// Shared device helpers of qmamba's kernels: the numerics contract of DESIGN.md §3 in CUDA, and argument checks.
#pragma once

#include <cstdint>
#include <utility>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <torch/all.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "common/check.h"

namespace qmamba {

// q = clamp(rint(p), -128, 127) for an already scaled p; rint = round half to even, never roundf. One saturating
// convert (cvt.rni.sat.s8: round to nearest even, then clamp to [-128, 127]; F2I.S8 in SASS) instead of a convert and
// two clamps. NaN gives 0. code_rn_s32 keeps the code sign-extended in a 32-bit register (kernels that pack four
// codes into one word with byte permutes skip the per-byte sign extension an int8_t would cost).
__device__ __forceinline__ int code_rn_s32(float p) {
  int q;
  asm("cvt.rni.sat.s8.f32 %0, %1;" : "=r"(q) : "f"(p));
  return q;
}
__device__ __forceinline__ int8_t code_rn(float p) { return static_cast<int8_t>(code_rn_s32(p)); }

// q = clamp(rint(v * inv_scale), -128, 127).
__device__ __forceinline__ int8_t quantize_rn(float v, float inv_scale) { return code_rn(__fmul_rn(v, inv_scale)); }

// The int32 sum of the 16 int8 products of two 16-byte chunks, added to acc (exact: four __dp4a).
__device__ __forceinline__ int dot16(const int4& a, const int4& b, int acc) {
  acc = __dp4a(a.x, b.x, acc);
  acc = __dp4a(a.y, b.y, acc);
  acc = __dp4a(a.z, b.z, acc);
  return __dp4a(a.w, b.w, acc);
}

// SiLU as torch computes it in fp32: x / (1 + exp(-x)).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// `silu` without the IEEE division's per-element slow-path branch: the quotient by the division's own fast path
// (approximate reciprocal of the divisor, one Newton step, one residual correction), which is the correctly rounded
// quotient wherever dividend, divisor and quotient are normal and finite: here x in [-80, FLT_MAX] or x == 0 (the
// divisor 1 + exp(-x) is then in [1, 6e34]). `ok` says whether x is there; for the others (rare in practice: very
// negative or subnormal inputs, inf, NaN) the caller takes `silu`, in a branch only they enter. Checked against
// `silu` for every fp32 bit pattern by tests/gpu/test_gpu_kernel_conv1d.py::test_conv_silu_is_exact.
__device__ __forceinline__ float silu_fast(float x, bool& ok) {
  const float y = 1.0f + expf(-x);
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  r = __fmaf_rn(r, __fmaf_rn(-y, r, 1.0f), r);
  const float q0 = __fmul_rn(x, r);
  ok = (x >= -80.0f && x <= 3.4028234663852886e38f && fabsf(x) >= 0x1p-124f) || x == 0.0f;
  const float q = __fmaf_rn(r, __fmaf_rn(-y, q0, x), q0);
  return x == 0.0f ? x : q;  // the residual step turns -0 into +0; the quotient of +-0 is +-0
}

// softplus as torch.nn.functional.softplus (beta 1, threshold 20): x above 20 passes through.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Round a float through the activation dtype T (what `.to(dtype)` does between two ops of the torch backend).
template <typename T> __device__ __forceinline__ float round_through(float v);
template <> __device__ __forceinline__ float round_through<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_through<at::Half>(float v) { return __half2float(__float2half_rn(v)); }
template <> __device__ __forceinline__ float round_through<at::BFloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// ---- dual-scale int8 (issue 5; torch twin and exact op order: qmamba/quant/dual_scale.py) ----------------------------
// enc 0: one scale (q * s_in); 1: "mask" (a 1-bit flag per element says q is at s_out); 2: "piecewise" (codes with
// |q| > knee are outliers: knee * s_in + (|q| - knee) * s_out, signed). __fmul_rn / __fadd_rn / __fsub_rn keep nvcc
// from contracting a product and a sum into one FMA, which the torch twin (separate ops) never does.
constexpr int kEncSingle = 0, kEncMask = 1, kEncPiecewise = 2;

struct DualScaleArgs {
  int enc;           // kEncSingle / kEncMask / kEncPiecewise
  int knee;          // piecewise: 1..126
  const float* s_out;  // the outlier scale (one element); nullptr for kEncSingle
};

// The fp32 value of code q (flag: its outlier bit, read only by the mask encoding).
__device__ __forceinline__ float dual_decode(int8_t q, bool flag, int enc, int knee, float s_in, float s_out) {
  if (enc == kEncMask) return static_cast<float>(q) * (flag ? s_out : s_in);
  if (enc == kEncPiecewise) {
    const int a = q < 0 ? -static_cast<int>(q) : static_cast<int>(q);
    if (a > knee) {
      const float outer = __fadd_rn(__fmul_rn(static_cast<float>(knee), s_in),
                                    __fmul_rn(static_cast<float>(a - knee), s_out));
      return q < 0 ? -outer : outer;
    }
  }
  return static_cast<float>(q) * s_in;
}

// The code of an outlier v (one whose inlier code would exceed the encoding's range: |rint(v / s_in)| > 127 for the
// mask encoding, > knee for piecewise) in encoding enc.
__device__ __forceinline__ int8_t dual_outlier_code(float v, int enc, int knee, float s_in, float inv_out) {
  if (enc == kEncMask) return quantize_rn(v, inv_out);
  const float kn = __fmul_rn(static_cast<float>(knee), s_in);
  const float u = __fmul_rn(__fsub_rn(fabsf(v), kn), inv_out);
  const float top = v >= 0.0f ? 127.0f : 128.0f;
  const float o = fminf(fmaxf(__fadd_rn(rintf(u), static_cast<float>(knee)), static_cast<float>(knee)), top);
  const int oi = static_cast<int>(o);
  return static_cast<int8_t>(v >= 0.0f ? oi : -oi);
}

// Where the outliers start, on |v * inv_in|: v is an outlier when its inlier code would leave the encoding's range,
// |rint(v * inv_in)| > limit (127 for the mask encoding, the knee for piecewise). rint rounds the tie limit + 0.5 to
// the even one of limit and limit + 1, so that is |v * inv_in| >= limit + 0.5 for an odd limit and > limit + 0.5 (>=
// the next float above it) for an even one. Computed once per thread; the per-value test is then one compare.
__device__ __forceinline__ float dual_outlier_threshold(int enc, int knee) {
  const int limit = enc == kEncMask ? 127 : knee;
  const float tie = static_cast<float>(limit) + 0.5f;
  return (limit & 1) ? tie : __uint_as_float(__float_as_uint(tie) + 1u);
}

// The inlier code of v, and whether v is an outlier instead (then the code is meaningless: take dual_outlier_code).
// The code is quantize_rn's (an inlier's |rint| is within the limit, so the saturation never acts), the flag one
// compare against dual_outlier_threshold: the same code and flag as |rint(v * inv_in)| > limit, NaN an inlier (code
// 0), without a separate rounding and convert per value (those run in the GPU's narrow conversion pipe, which the
// conv1d epilogue already keeps busy).
__device__ __forceinline__ int8_t dual_inlier_code(float v, float inv_in, float threshold, bool& flag) {
  const float p = __fmul_rn(v, inv_in);
  flag = fabsf(p) >= threshold;
  return code_rn(p);
}

// The code of v (and its outlier flag) in encoding enc (kEncMask or kEncPiecewise); inv_in = 1 / s_in and
// inv_out = 1 / s_out computed once by the caller (IEEE division, as torch's 1.0 / s).
__device__ __forceinline__ int8_t dual_encode(float v, int enc, int knee, float s_in, float inv_in, float inv_out,
                                              bool& flag) {
  const int8_t q = dual_inlier_code(v, inv_in, dual_outlier_threshold(enc, knee), flag);
  return flag ? dual_outlier_code(v, enc, knee, s_in, inv_out) : q;
}

// ---- overlapped launches (programmatic dependent launch, sm_90+) ------------------------------------------------------
// Every qmamba kernel is launched with launch_overlapped, which lets the GPU start launching it while the kernel before
// it in the stream is still running (inside a CUDA graph too: a decode step is a chain of small kernels, and each
// boundary otherwise costs a launch and a ramp of a few microseconds). The rules that keep it exact:
//   1. a kernel's first statement is kernel_prologue(): it waits until the previous kernel of the stream has completed
//      and its writes are visible, then lets the next kernel start launching; nothing before it reads memory that
//      another kernel writes or writes global memory (read-only weights may be prefetched: gemv_int8.cu);
//   2. every block runs it, including blocks that then have nothing to do, so a kernel never completes before the one
//      before it: waiting on the previous kernel is waiting on all earlier ones.
// Kernels of other libraries (torch, Triton) are launched normally and wait as usual. set_launch_overlap(False) (the op
// qmamba::set_launch_overlap) launches ours normally too: benchmarks/latency.py measures both in one run.
__device__ __forceinline__ void kernel_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool launch_overlap = true;  // one flag for the whole extension (an inline variable: one object in all files)

// Whether launches on `device` overlap: the flag, and a GPU that has programmatic dependent launch (sm_90+).
inline bool overlap_on(int device) {
  static int major[64] = {0};  // per device; a race only writes the same value twice
  if (!launch_overlap) return false;
  if (device < 0 || device >= 64) return false;
  if (major[device] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor,
                                                                device));
  return major[device] >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), overlapped with the previous kernel where overlap_on; checked.
template <typename... Params, typename... Args>
void launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = overlap_on(device) ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(std::forward<Args>(args))...));
}

}  // namespace qmamba

#define QMAMBA_CHECK_CUDA(x) QMAMBA_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define QMAMBA_CHECK_DTYPE(x, dt) \
  QMAMBA_CHECK((x).scalar_type() == (dt), #x " must be " #dt ", got ", (x).scalar_type())
#define QMAMBA_CHECK_SCALAR_SCALE(x) \
  QMAMBA_CHECK((x).is_cuda() && (x).scalar_type() == at::kFloat && (x).numel() == 1, \
               #x " must be a one-element float32 CUDA tensor (a per-tensor scale)")
