// Shared device helpers of qmamba's kernels: the numerics contract of DESIGN.md §3 in CUDA, and argument checks.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <torch/all.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

namespace qmamba {

// q = clamp(rint(v * inv_scale), -128, 127); rint = round half to even (__float2int_rn), never roundf.
__device__ __forceinline__ int8_t quantize_rn(float v, float inv_scale) {
  int q = __float2int_rn(v * inv_scale);
  q = q < -128 ? -128 : (q > 127 ? 127 : q);
  return static_cast<int8_t>(q);
}

// SiLU as torch computes it in fp32: x / (1 + exp(-x)).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// softplus as torch.nn.functional.softplus (beta 1, threshold 20): x above 20 passes through.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Round a float through the activation dtype T (what `.to(dtype)` does between two ops of the torch backend).
template <typename T> __device__ __forceinline__ float round_through(float v);
template <> __device__ __forceinline__ float round_through<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_through<at::Half>(float v) { return __half2float(__float2half_rn(v)); }
template <> __device__ __forceinline__ float round_through<at::BFloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

}  // namespace qmamba

#define QMAMBA_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define QMAMBA_CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be " #dt ", got ", (x).scalar_type())
#define QMAMBA_CHECK_SCALAR_SCALE(x) \
  TORCH_CHECK((x).is_cuda() && (x).scalar_type() == at::kFloat && (x).numel() == 1, \
              #x " must be a one-element float32 CUDA tensor (a per-tensor scale)")
