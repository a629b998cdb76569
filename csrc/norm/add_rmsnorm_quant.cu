// Fused residual add + RMSNorm + int8 quantize: the pre-norm of each residual block, feeding the int8 in_proj.
// Torch twin: qmamba/ops/int8_norm.py (add_rmsnorm_quant_ref) = Block.forward's add + rms_norm_ref + the int8
// QuantLinear's input quantizer:
//
//   r     = hidden (+ residual)          in the promoted dtype S of the add (fp16 + fp32 -> fp32), stored as
//                                        residual_out in P = fp32 if residual_in_fp32 else S
//   x     = round_through<W>(r)          W = the norm weight's dtype
//   y     = round_through<W>((x * rsqrt(mean(x^2) + eps)) * w)      fp32, no FMA contraction
//   codes = clamp(rint(y * (1 / in_scale)), -128, 127)
//
// One block per row (token); each thread keeps its few elements of the row in registers between the sum of squares
// and the output, so the row is read once. The mean's summation order differs from torch's, so codes may differ by
// 1 LSB, rarely (DESIGN §3); residual_out is exact.
#include "common/qmamba_common.cuh"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace qmamba {
namespace {

constexpr int kPerThread = 8;    // row elements held per thread
constexpr int kMaxThreads = 1024;
constexpr int kMaxD = kPerThread * kMaxThreads;  // 8192

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// H: hidden, R: residual, S: dtype of hidden + residual, P: residual_out, W: norm weight (the norm's dtype).
template <typename H, typename R, typename S, typename P, typename W>
__global__ void __launch_bounds__(kMaxThreads) add_rmsnorm_quant_kernel(
    const H* __restrict__ hidden, const R* __restrict__ residual, const W* __restrict__ weight, float eps,
    const float* __restrict__ in_scale, int8_t* __restrict__ codes, P* __restrict__ residual_out, int d) {
  kernel_prologue();  // first: see launch_overlapped (common/qmamba_common.cuh)
  const int64_t off = static_cast<int64_t>(blockIdx.x) * d;
  hidden += off;
  codes += off;
  residual_out += off;
  if (residual != nullptr) residual += off;

  // the weight and the scale are loaded with the row, not after the sum: one round trip of memory before the sum
  float xv[kPerThread];
  W wv[kPerThread];
  const float in_s = *in_scale;
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    xv[j] = 0.0f;
    wv[j] = W(0.0f);
    if (i < d) {
      wv[j] = weight[i];
      float r = static_cast<float>(hidden[i]);
      // the add runs in fp32 and rounds to S, as torch's elementwise add does
      if (residual != nullptr) r = round_through<S>(r + static_cast<float>(residual[i]));
      residual_out[i] = static_cast<P>(r);  // exact: r is representable in S, and P is S or fp32
      const float x = round_through<W>(r);
      xv[j] = x;
      ss += x * x;
    }
  }
  ss = block_sum(ss);
  // the mean as torch's CUDA reduction projects it (sum * (1 / n)), rsqrt as torch.rsqrt on CUDA (rsqrtf), then
  // two separately rounded multiplies
  const float rstd = rsqrtf(ss * (1.0f / static_cast<float>(d)) + eps);
  const float inv = 1.0f / in_s;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < d) {
      const float y = round_through<W>(__fmul_rn(__fmul_rn(xv[j], rstd), static_cast<float>(wv[j])));
      codes[i] = quantize_rn(y, inv);
    }
  }
}

template <typename F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: QMAMBA_CHECK(false, "add_rmsnorm_quant: ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

std::vector<at::Tensor> add_rmsnorm_quant(const at::Tensor& hidden, const std::optional<at::Tensor>& residual,
                                          const at::Tensor& weight, double eps, const at::Tensor& in_scale,
                                          bool residual_in_fp32) {
  QMAMBA_CHECK_CUDA(hidden);
  QMAMBA_CHECK(hidden.dim() >= 1, "add_rmsnorm_quant: hidden must be (..., d), got a 0-dim tensor");
  const int64_t d = hidden.size(-1);
  QMAMBA_CHECK(d >= 1 && d <= kMaxD, "add_rmsnorm_quant: the kernel normalizes rows of 1..", kMaxD,
               " elements, got d = ", d, "; use backend='torch'");
  const auto dev = hidden.device();
  QMAMBA_CHECK(weight.is_cuda() && weight.device() == dev && weight.dim() == 1 && weight.size(0) == d,
               "add_rmsnorm_quant: weight must be a (", d, ",) tensor on ", dev, ", got ", weight.sizes(), " on ",
               weight.device());
  QMAMBA_CHECK_SCALAR_SCALE(in_scale);
  QMAMBA_CHECK(in_scale.device() == dev, "add_rmsnorm_quant: in_scale is on ", in_scale.device(), " but hidden is on ",
               dev);
  const auto h_dtype = hidden.scalar_type();
  bool r_float = false;
  if (residual.has_value()) {
    const auto& r = *residual;
    QMAMBA_CHECK(r.is_cuda() && r.device() == dev && r.sizes() == hidden.sizes(),
                 "add_rmsnorm_quant: residual must have hidden's shape ", hidden.sizes(), " on ", dev, ", got ",
                 r.sizes(), " on ", r.device());
    QMAMBA_CHECK(r.scalar_type() == h_dtype || r.scalar_type() == at::kFloat,
                 "add_rmsnorm_quant: residual must have hidden's dtype (", h_dtype, ") or float32, got ",
                 r.scalar_type());
    r_float = r.scalar_type() == at::kFloat;
  }
  const at::ScalarType sum_dtype = r_float ? at::kFloat : h_dtype;  // torch's promotion of hidden + residual
  const bool p_float = residual_in_fp32 || sum_dtype == at::kFloat;
  const at::ScalarType p_dtype = p_float ? at::kFloat : h_dtype;

  const c10::cuda::OptionalCUDAGuard guard(dev);
  const at::Tensor h = hidden.contiguous();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor w = weight.contiguous();
  const int64_t T = hidden.numel() / d;
  at::Tensor codes = at::empty({T, d}, hidden.options().dtype(at::kChar));
  at::Tensor residual_out = at::empty({T, d}, hidden.options().dtype(p_dtype));
  if (T == 0) return {codes, residual_out};
  QMAMBA_CHECK(T < (int64_t(1) << 31), "add_rmsnorm_quant: ", T, " rows exceed the kernel's grid limit");

  // about 4 elements per thread: enough threads to hide latency at T = 1 (decode), few enough to keep many rows
  // resident; at most kPerThread per thread
  int64_t threads = ((d + 3) / 4 + 31) / 32 * 32;
  threads = std::max<int64_t>(threads, ((d + kPerThread - 1) / kPerThread + 31) / 32 * 32);
  threads = std::min<int64_t>(std::max<int64_t>(threads, 32), kMaxThreads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float eps_f = static_cast<float>(eps);

  dispatch_float(h_dtype, "hidden", [&](auto h_tag) {
    using H = decltype(h_tag);
    dispatch_float(w.scalar_type(), "weight", [&](auto w_tag) {
      using W = decltype(w_tag);
      auto launch = [&](auto r_tag, auto p_tag) {
        using R = decltype(r_tag);
        using P = decltype(p_tag);
        using S = std::conditional_t<std::is_same_v<R, float>, float, H>;
        launch_overlapped(add_rmsnorm_quant_kernel<H, R, S, P, W>, dim3(static_cast<unsigned>(T)),
                          dim3(static_cast<unsigned>(threads)), 0, stream,
            h.data_ptr<H>(), r.defined() ? r.data_ptr<R>() : nullptr, w.data_ptr<W>(), eps_f,
            in_scale.data_ptr<float>(), codes.data_ptr<int8_t>(), residual_out.data_ptr<P>(), static_cast<int>(d));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (r_float) {
        launch(float{}, float{});
      } else if (p_float) {
        launch(H{}, float{});
      } else {
        launch(H{}, H{});
      }
    });
  });
  return {codes, residual_out};
}

}  // namespace
}  // namespace qmamba

TORCH_LIBRARY_FRAGMENT(qmamba, m) {
  m.def("add_rmsnorm_quant(Tensor hidden, Tensor? residual, Tensor weight, float eps, Tensor in_scale, "
        "bool residual_in_fp32) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(qmamba, CUDA, m) { m.impl("add_rmsnorm_quant", &qmamba::add_rmsnorm_quant); }
