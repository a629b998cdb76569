// Int8 causal depthwise conv1d + bias + SiLU, with the output requantized to int8 for each consumer (prefill), and
// its one-token update against an int8 conv state (decode). Torch twin: qmamba/ops/int8_conv1d.py
// (conv1d_int8_ref / conv1d_int8_update_ref), which is QuantCausalConv1d._int8_forward plus the consumer's quantizer:
//
//   acc  = sum_{i<K} w[c,i] * x[t-(K-1)+i]            int32 (x = 0 before t = 0)
//   v    = acc * (s_x * s_w[c]) (+ bias[c])           fp32, scales multiplied first, no FMA contraction
//   v    = silu(v) (if silu); v = round_through<out_dtype>(v)
//   out  = v in out_dtype, or codes_j = clamp(rint(v * (1 / out_scale_j)), -128, 127) for each out_scale
//   one output may be dual-scale (issue 5: the SSM input u): codes = dual_encode(v) (common/qmamba_common.cuh) in the
//   mask or piecewise encoding, plus, for the mask encoding, its outlier flags packed 8 time steps a byte (byte t / 8,
//   bit t % 8, as qmamba.quant.dual_scale.pack_mask packs (B, D, L) along L); the update writes one byte per (b, d).
//
// Layout: x (B, D, L) int8 with any strides; outputs (B, D, L) allocated channel-last (a contiguous (B, L, D) tensor
// transposed), which the next GEMM reads as (B*L, D) rows. Prefill threads map to channels (coalesced when x's channel
// stride is 1, as for Mamba1's transposed in_proj slice) and walk a tile of time steps, keeping each channel's last 4
// inputs packed in one register (summed against the packed taps by __dp4a); four channels per thread (32-bit loads,
// vector stores) where strides and alignment allow. The update kernel runs one thread per (b, d).
#include "common/qmamba_common.cuh"
#include "conv1d/conv1d_update.cuh"  // Outputs, epilogue, the update's math, the shared host checks

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

namespace qmamba {
namespace {

constexpr int kThreads = 128;  // prefill threads per block
constexpr int kMinBlocks = 8;  // per SM: caps registers at 64 so 1024 threads per SM keep loads in flight
constexpr int kChunk = 8;      // time steps each thread loads ahead before computing (memory-level parallelism)

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// epilogue for VEC values of one time step, with silu_fast: the exact IEEE SiLU without a branch per value; the rare
// values outside silu_fast's range take `silu` in one branch per step. The bias is always added (+0.0f without one:
// exact, since acc * scale is never -0: acc == 0 gives +0 and scale > 0).
template <typename T, int VEC>
__device__ __forceinline__ void epilogue_step(const int (&acc)[VEC], const float (&scale)[VEC],
                                              const float (&bias)[VEC], bool silu_on, float (&val)[VEC]) {
  float pre[VEC];
  bool ok_all = true;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    pre[v] = __fadd_rn(__fmul_rn(static_cast<float>(acc[v]), scale[v]), bias[v]);
    bool ok = true;
    val[v] = silu_on ? silu_fast(pre[v], ok) : pre[v];
    ok_all &= ok;
  }
  if (__builtin_expect(!ok_all, 0)) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) val[v] = silu(pre[v]);
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) val[v] = round_through<T>(val[v]);
}

template <int VEC>
__device__ __forceinline__ uint32_t load_raw(const int8_t* p) {
  if constexpr (VEC == 4) {
    // channel stride 1 and 4-byte alignment are checked on the host
    return *reinterpret_cast<const uint32_t*>(p);
  } else {
    return static_cast<uint8_t>(*p);
  }
}

// Append byte v of `raw` (the newest input of channel v) to a packed window of the last 4 inputs, oldest in byte 0:
// (win >> 8) | (raw.byte[v] << 24) in one byte permute (v is a constant after unrolling, so the selector folds).
__device__ __forceinline__ uint32_t push(uint32_t win, uint32_t raw, int v) {
  return __byte_perm(win, raw, 0x0321u | ((4u + static_cast<uint32_t>(v)) << 12));
}

// Where one thread writes: its outputs' base pointers at its batch (hoisted out of the time loop) and the offset of its
// (t, c0) in that batch's (L, D) plane, advanced by D per step. D * L < 2^31 is checked on the host, so 32 bits hold
// it and each store costs one add; recomputing (b * L + t) * D + c0 in 64 bits per output and step made address
// arithmetic the largest part of the loop.
struct RowPtrs {
  int8_t* code[kMaxOuts];  // single-scale outputs (n_codes of them)
  void* flt;               // the float output (n_codes == 0 and no dual output)
  int8_t* dual;            // the dual-scale output's codes, or nullptr
};

// Store VEC codes (sign-extended ints, as code_rn_s32 gives them) as VEC consecutive bytes: four in one 32-bit word
// by three byte permutes.
template <int VEC>
__device__ __forceinline__ void store_bytes(int8_t* dst, const int (&q)[VEC]) {
  if constexpr (VEC == 4) {
    const uint32_t lo = __byte_perm(q[0], q[1], 0x0040u), hi = __byte_perm(q[2], q[3], 0x0040u);
    *reinterpret_cast<uint32_t*>(dst) = __byte_perm(lo, hi, 0x5410u);
  } else {
    *dst = static_cast<int8_t>(q[0]);
  }
}

// Write the single-scale codes of VEC consecutive channels of one (b, t) row, one output per consumer scale.
template <int VEC>
__device__ __forceinline__ void store_codes(const RowPtrs& p, int n_codes, const float (&inv)[kMaxOuts], uint32_t off,
                                            const float (&val)[VEC]) {
#pragma unroll
  for (int j = 0; j < kMaxOuts; ++j) {
    if (j < n_codes) {
      int q[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) q[v] = code_rn_s32(__fmul_rn(val[v], inv[j]));
      store_bytes<VEC>(p.code[j] + off, q);
    }
  }
}

// Write VEC consecutive channels of one (b, t) row of every output.
template <typename T, int VEC>
__device__ __forceinline__ void store(const RowPtrs& p, int n_codes, const float (&inv)[kMaxOuts], uint32_t off,
                                      const float (&val)[VEC]) {
  if (n_codes == 0) {
    Pack<T, VEC> o;
#pragma unroll
    for (int v = 0; v < VEC; ++v) o.v[v] = static_cast<T>(val[v]);  // exact: val is already rounded through T
    *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(p.flt) + off) = o;
    return;
  }
  store_codes<VEC>(p, n_codes, inv, off, val);
}

// store for a call with a dual-scale output (encoding ENC, a compile-time constant): the single-scale codes as
// `store`, the dual output's codes, and bit `bit` of flags[v] set where channel v is an outlier (the caller packs 8
// steps of flags into a mask byte). Every value takes the inlier code (quantize_rn's); one compare of the largest
// |v * inv_in| of the VEC values against `threshold` (dual_outlier_threshold) says whether any is an outlier. Only
// then (rows holding an outlier: about 0.1 % of values, 12 % of a warp's steps at VEC 4) are the outlier codes
// computed, for all VEC values without a branch each (independent chains the GPU overlaps) and selected by their
// flags. The same codes and flags as dual_encode per value; NaN stays an inlier (fmaxf drops it), as there.
template <int VEC, int ENC>
__device__ __forceinline__ void store_dual(const RowPtrs& p, int n_codes, const float (&inv)[kMaxOuts], int knee,
                                           float threshold, float s_in, float inv_in, float inv_out, uint32_t off,
                                           const float (&val)[VEC], int bit, uint32_t (&flags)[VEC]) {
  store_codes<VEC>(p, n_codes, inv, off, val);
  int q[VEC];
  float scaled[VEC];
  float amax = 0.0f;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    scaled[v] = __fmul_rn(val[v], inv_in);
    q[v] = code_rn_s32(scaled[v]);
    amax = fmaxf(amax, fabsf(scaled[v]));
  }
  if (__builtin_expect(amax >= threshold, 0)) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const bool outlier = fabsf(scaled[v]) >= threshold;
      const int qo = dual_outlier_code(val[v], ENC, knee, s_in, inv_out);
      q[v] = outlier ? qo : q[v];
      if constexpr (ENC == kEncMask) flags[v] |= static_cast<uint32_t>(outlier) << bit;
    }
  }
  store_bytes<VEC>(p.dual + off, q);
}

// grid (ceil(D / (VEC * kThreads)), ceil(L / tile_l), B). Thread: VEC channels x tile_l time steps. The int8 taps
// and the window of the last 4 inputs of a channel each pack into one 32-bit register, and __dp4a sums their 4
// products exactly in int32 (the same integer as the twin's sum). K < 4 taps are right-aligned with zero taps before.
// ENC: the encoding of the call's dual-scale output, kEncSingle for none (a separate instantiation each, so
// single-scale calls run the code they always ran). tile_l is a multiple of kChunk = 8: each chunk of 8 steps is one
// byte of the mask. Chunks that end inside the tile (all but a sequence's last) run without per-step bounds checks.
template <typename T, int VEC, int ENC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) conv1d_int8_kernel(
    const int8_t* __restrict__ x, int64_t sxb, int64_t sxd, int64_t sxl, const int8_t* __restrict__ w, int K,
    const float* __restrict__ x_scale, const float* __restrict__ w_scale, bool w_per_channel,
    const float* __restrict__ bias, bool silu_on, int D, int L, int tile_l, Outputs outs) {
  kernel_prologue();  // first: see launch_overlapped (common/qmamba_common.cuh)
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= D) return;
  const int b = blockIdx.z;
  const int t0 = blockIdx.y * tile_l;
  const int t_end = min(t0 + tile_l, L);

  int wt[VEC];  // packed taps of channel c0 + v: byte j holds w[c][j - (4 - K)], zero for j < 4 - K
  uint32_t win[VEC];
  float scale[VEC], bias_v[VEC];
  const float sx = *x_scale;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int c = c0 + v;
    uint32_t packed = 0;
    for (int i = 0; i < K; ++i)
      packed |= static_cast<uint32_t>(static_cast<uint8_t>(w[c * K + i])) << (8 * (kMaxTaps - K + i));
    wt[v] = static_cast<int>(packed);
    win[v] = 0;
    scale[v] = __fmul_rn(sx, w_scale[w_per_channel ? c : 0]);
    // without a bias the epilogue adds +0.0f (exact: see epilogue_step)
    bias_v[v] = bias != nullptr ? bias[c] : 0.0f;
  }
  float inv[kMaxOuts];
#pragma unroll
  for (int j = 0; j < kMaxOuts; ++j) inv[j] = j < outs.n_codes ? 1.0f / *outs.scale[j] : 0.0f;
  constexpr bool DUAL = ENC != kEncSingle;
  float s_in_dual = 0.0f, inv_in_dual = 0.0f, inv_out_dual = 0.0f, threshold = 0.0f;
  if constexpr (DUAL) {
    threshold = dual_outlier_threshold(ENC, outs.dual_knee);
    s_in_dual = *outs.dual_s_in;
    inv_in_dual = 1.0f / s_in_dual;
    inv_out_dual = 1.0f / *outs.dual_s_out;
  }

  const int8_t* xb = x + b * sxb + c0 * sxd;
  // the 3 inputs before the tile (zero before t = 0) fill bytes 1..3 of the window; byte 0 drops out at the first step
#pragma unroll
  for (int j = kMaxTaps - 1; j >= 1; --j) {
    const int t = t0 - j;
    const uint32_t raw = t >= 0 ? load_raw<VEC>(xb + t * sxl) : 0u;
#pragma unroll
    for (int v = 0; v < VEC; ++v) win[v] = push(win[v], raw, v);
  }

  const int64_t bo = static_cast<int64_t>(b) * L * D;  // the batch's offset in every (B, L, D) output
  RowPtrs p;
#pragma unroll
  for (int j = 0; j < kMaxOuts; ++j) p.code[j] = j < outs.n_codes ? static_cast<int8_t*>(outs.out[j]) + bo : nullptr;
  p.flt = outs.n_codes == 0 && !DUAL ? static_cast<void*>(static_cast<T*>(outs.out[0]) + bo) : nullptr;
  p.dual = DUAL ? outs.dual_out + bo : nullptr;
  uint32_t off = static_cast<uint32_t>(t0) * static_cast<uint32_t>(D) + static_cast<uint32_t>(c0);

  // one chunk of kChunk steps from t; FULL: all kChunk steps lie before t_end (no per-step checks)
  auto chunk = [&](int t, auto full_tag) {
    constexpr bool FULL = decltype(full_tag)::value;
    uint32_t buf[kChunk];  // loaded ahead: kChunk independent loads in flight per thread
    const int8_t* xt = xb + static_cast<int64_t>(t) * sxl;
#pragma unroll
    for (int s = 0; s < kChunk; ++s) buf[s] = (FULL || t + s < t_end) ? load_raw<VEC>(xt + s * sxl) : 0u;
    uint32_t flags[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) flags[v] = 0u;
#pragma unroll
    for (int s = 0; s < kChunk; ++s) {
      if (FULL || t + s < t_end) {
        int acc[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          win[v] = push(win[v], buf[s], v);
          acc[v] = __dp4a(static_cast<int>(win[v]), wt[v], 0);
        }
        float val[VEC];
        epilogue_step<T, VEC>(acc, scale, bias_v, silu_on, val);
        if constexpr (DUAL) {
          store_dual<VEC, ENC>(p, outs.n_codes, inv, outs.dual_knee, threshold, s_in_dual, inv_in_dual, inv_out_dual,
                               off, val, s, flags);
        } else {
          store<T, VEC>(p, outs.n_codes, inv, off, val);
        }
        off += static_cast<uint32_t>(D);
      }
    }
    if constexpr (ENC == kEncMask) {  // steps past L leave their bits 0, as pack_mask's zero padding does
      Pack<uint8_t, VEC> m;
#pragma unroll
      for (int v = 0; v < VEC; ++v) m.v[v] = static_cast<uint8_t>(flags[v]);
      const int64_t l8 = (L + kChunk - 1) / kChunk;
      *reinterpret_cast<Pack<uint8_t, VEC>*>(outs.mask + (static_cast<int64_t>(b) * l8 + t / kChunk) * D + c0) = m;
    }
  };
  int t = t0;
  for (; t + kChunk <= t_end; t += kChunk) chunk(t, std::true_type{});
  if (t < t_end) chunk(t, std::false_type{});
}

// One thread per (b, c): shift the state left by one, append x, convolve the K codes the state now holds
// (conv_channel_load / conv_channel_run, shared with the GEMV that fuses this update into its epilogue).
template <typename T>
__global__ void conv1d_int8_update_kernel(const int8_t* __restrict__ x, int64_t sxb, int64_t sxd, int8_t* state,
                                          int64_t ssb, int64_t ssd, int64_t ssk, const int8_t* __restrict__ w, int K,
                                          const float* __restrict__ x_scale, const float* __restrict__ w_scale,
                                          bool w_per_channel, const float* __restrict__ bias, bool silu_on, int B,
                                          int D, Outputs outs) {
  kernel_prologue();  // first: see launch_overlapped (common/qmamba_common.cuh)
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(B) * D) return;
  const int b = static_cast<int>(idx / D), c = static_cast<int>(idx % D);
  int8_t* s = state + b * ssb + c * ssd;
  const ConvChannel ch = conv_channel_load(s, ssk, w + c * K, K, w_scale[w_per_channel ? c : 0], bias, c, outs);
  conv_channel_run<T>(ch, x[b * sxb + c * sxd], s, ssk, K, *x_scale, silu_on, outs, idx);
}

// The prefill epilogue's SiLU (silu_fast, `silu` where it is out of range) on an fp32 tensor, elementwise: what its
// exhaustive test compares with torch's fp32 SiLU.
__global__ void conv1d_silu_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  kernel_prologue();  // first: see launch_overlapped (common/qmamba_common.cuh)
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  bool ok = true;
  const float v = silu_fast(x[i], ok);
  y[i] = ok ? v : silu(x[i]);
}

at::Tensor conv1d_silu(const at::Tensor& x) {
  QMAMBA_CHECK_CUDA(x);
  QMAMBA_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(),
               "conv1d_silu: x must be a contiguous float32 tensor");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  constexpr int threads = 256;
  launch_overlapped(conv1d_silu_kernel, dim3(static_cast<unsigned>((n + threads - 1) / threads)), dim3(threads), 0,
                    c10::cuda::getCurrentCUDAStream().stream(), x.data_ptr<float>(), y.data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// Multiprocessors of a device, queried once (no CUDA API call in later launches, e.g. under graph capture).
int sm_count(int device) {
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached] = {};
  int n = (device >= 0 && device < kCached) ? cache[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < kCached) cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename F>
void dispatch_out_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: QMAMBA_CHECK(false, "conv1d_int8: out_dtype must be float32, float16 or bfloat16 (the activation dtype), "
                                 "got ", t);
  }
}

std::vector<at::Tensor> conv1d_int8(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                                    const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, bool silu,
                                    at::ScalarType out_dtype, at::TensorList out_scales, int64_t dual_index,
                                    int64_t dual_encoding, int64_t dual_knee,
                                    const std::optional<at::Tensor>& dual_outlier_scale) {
  QMAMBA_CHECK(x.dim() == 3, "conv1d_int8: x must be (B, D, L) int8 codes, got ", x.sizes());
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2);
  ConvArgs a = check_conv_args("conv1d_int8", x, D, x_scale, w, w_scale, bias, out_dtype, out_scales);
  QMAMBA_CHECK(B <= 65535, "conv1d_int8: batch ", B, " exceeds the kernel's grid limit of 65535; split the batch");
  QMAMBA_CHECK(D * L < (int64_t(1) << 31) && D < (int64_t(1) << 31), "conv1d_int8: D * L = ", D * L,
               " is too large for the kernel's indexing; split the sequence");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  std::vector<at::Tensor> results;
  Outputs outs = make_conv_outputs("conv1d_int8", x, out_dtype, out_scales, dual_index, dual_encoding, dual_knee,
                              dual_outlier_scale, {B, L, D}, {B, (L + kChunk - 1) / kChunk, D},
                              /*transpose12=*/true, results);
  if (B * D * L == 0) return results;

  const int64_t sxb = x.stride(0), sxd = x.stride(1), sxl = x.stride(2);
  const auto xaddr = reinterpret_cast<uintptr_t>(x.data_ptr());
  const bool vec4 = sxd == 1 && D % 4 == 0 && sxb % 4 == 0 && (sxl % 4 == 0 || L == 1) && xaddr % 4 == 0;
  const int vec = vec4 ? 4 : 1;
  const int64_t grid_x = (D + int64_t(vec) * kThreads - 1) / (int64_t(vec) * kThreads);

  // Shorter time tiles where the batch and channels alone would leave the GPU idle (short prompts, batch 1); a
  // decision on shapes only, so the launch is the same in every replay of a CUDA graph.
  const int sms = sm_count(x.get_device());
  int64_t tile = 64;
  auto n_tiles = [&](int64_t t) { return (L + t - 1) / t; };
  while (tile > 16 && grid_x * B * n_tiles(tile) < int64_t(sms) * 8) tile /= 2;
  while (n_tiles(tile) > 65535) tile *= 2;

  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(n_tiles(tile)), static_cast<unsigned>(B));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* bias_p = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  dispatch_out_dtype(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = vec4 ? conv1d_int8_kernel<T, 4, kEncSingle> : conv1d_int8_kernel<T, 1, kEncSingle>;
    if (outs.dual_enc == kEncMask) {
      kernel = vec4 ? conv1d_int8_kernel<T, 4, kEncMask> : conv1d_int8_kernel<T, 1, kEncMask>;
    }
    if (outs.dual_enc == kEncPiecewise) {
      kernel = vec4 ? conv1d_int8_kernel<T, 4, kEncPiecewise> : conv1d_int8_kernel<T, 1, kEncPiecewise>;
    }
    launch_overlapped(kernel, grid, dim3(kThreads), 0, stream, x.data_ptr<int8_t>(), sxb, sxd, sxl, a.w.data_ptr<int8_t>(), a.K,
                                          x_scale.data_ptr<float>(), w_scale.data_ptr<float>(), a.w_per_channel,
                                          bias_p, silu, static_cast<int>(D), static_cast<int>(L),
                                          static_cast<int>(tile), outs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return results;
}

std::vector<at::Tensor> conv1d_int8_update(const at::Tensor& x, const at::Tensor& conv_state,
                                           const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                                           const std::optional<at::Tensor>& bias, bool silu, at::ScalarType out_dtype,
                                           at::TensorList out_scales, int64_t dual_index, int64_t dual_encoding,
                                           int64_t dual_knee, const std::optional<at::Tensor>& dual_outlier_scale) {
  QMAMBA_CHECK(x.dim() == 2, "conv1d_int8_update: x must be (B, D) int8 codes of one token, got ", x.sizes());
  const int64_t B = x.size(0), D = x.size(1);
  ConvArgs a = check_conv_args("conv1d_int8_update", x, D, x_scale, w, w_scale, bias, out_dtype, out_scales);
  check_conv_state("conv1d_int8_update", conv_state, x, B, D, a.K, "B");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  std::vector<at::Tensor> results;
  Outputs outs = make_conv_outputs("conv1d_int8_update", x, out_dtype, out_scales, dual_index, dual_encoding, dual_knee,
                              dual_outlier_scale, {B, D}, {B, D}, /*transpose12=*/false, results);
  if (B * D == 0) return results;

  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>((B * D + threads - 1) / threads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* bias_p = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  dispatch_out_dtype(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_overlapped(conv1d_int8_update_kernel<T>, dim3(blocks), dim3(threads), 0, stream,
        x.data_ptr<int8_t>(), x.stride(0), x.stride(1), conv_state.data_ptr<int8_t>(), conv_state.stride(0),
        conv_state.stride(1), conv_state.stride(2), a.w.data_ptr<int8_t>(), a.K, x_scale.data_ptr<float>(),
        w_scale.data_ptr<float>(), a.w_per_channel, bias_p, silu, static_cast<int>(B), static_cast<int>(D), outs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return results;
}

}  // namespace
}  // namespace qmamba

TORCH_LIBRARY_FRAGMENT(qmamba, m) {
  m.def("conv1d_int8(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, bool silu, "
        "ScalarType out_dtype, Tensor[] out_scales, int dual_index, int dual_encoding, int dual_knee, "
        "Tensor? dual_outlier_scale) -> Tensor[]");
  m.def("conv1d_int8_update(Tensor x, Tensor(a!) conv_state, Tensor x_scale, Tensor w, Tensor w_scale, "
        "Tensor? bias, bool silu, ScalarType out_dtype, Tensor[] out_scales, int dual_index, int dual_encoding, "
        "int dual_knee, Tensor? dual_outlier_scale) -> Tensor[]");
  m.def("conv1d_silu(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(qmamba, CUDA, m) {
  m.impl("conv1d_int8", &qmamba::conv1d_int8);
  m.impl("conv1d_int8_update", &qmamba::conv1d_int8_update);
  m.impl("conv1d_silu", &qmamba::conv1d_silu);
}
