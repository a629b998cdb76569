// W8A8 GEMV for one-token decoding (M = 1..8 rows): int8 x int8 -> int32 (__dp4a) -> fused dequant epilogue
// (+ bias, round through the activation dtype, optional per-column requant to int8 codes).
//
//   x (M, K) int8, x_scale one-element fp32      w (N, K) int8 row-major (nn.Linear), w_scale 1 or N fp32
//   acc[m, n] = sum_k x[m, k] w[n, k]                              int32, exact
//   out[m, n] = float(acc) * (x_scale * w_scale[n]) (+ bias[n])     fp32, every op rounded (no FMA contraction)
//   y = out rounded to out_dtype; with out_scale: q = clamp(rint(y * (1 / out_scale[n])), -128, 127)
//   out_scale: one scale per column (N), or one per segment of columns (up to kMaxSegments one-element tensors and
//   the first column of each segment after the first, out_bounds): a layer whose output columns feed several
//   consumers (in_proj -> conv1d and the scan's z, x_proj -> dt_proj and the scan's B and C) emits each consumer's
//   codes in its own scale, with no per-column scale tensor to build at every call
// = qmamba.ops.int8_linear.w8a8_linear_ref, bit for bit.
//
// Memory bound: the weight is read exactly once, with 16-byte streaming loads. A block owns kRows output rows; its
// warps split K into 16-byte chunks (lane-strided, so a warp reads 512 contiguous bytes of a row per step), each x
// chunk loaded once serves kRows weight rows, two steps are in flight per thread, partial sums are reduced with warp
// shuffles then across warps in shared memory, and kRows * M threads run the epilogue.
//
// w8a8_gemv_conv_update: the same GEMV with Mamba1's conv1d decode update fused into its epilogue (in_proj -> conv1d:
// one kernel fewer per layer and decode step). The first conv_columns output columns are the conv's input, requantized
// in segment 0's scale exactly as above; the thread that makes code q of (row m, column n < conv_columns) then runs the
// conv update of channel n of sequence m with q as the new input (conv_channel_load / conv_channel_run,
// conv1d/conv1d_update.cuh: the one copy of conv1d_int8_update_kernel's math; the loads are issued before the dot
// products), so the codes, the conv state and the conv's outputs are bit for bit
// those of w8a8_gemv then conv1d_int8_update. Each (m, n) has one thread: no two threads touch one state row.
#include "common/qmamba_common.cuh"
#include "conv1d/conv1d_update.cuh"

#include <cuda_runtime.h>

#include <climits>

namespace qmamba {
namespace {

constexpr int kRows = 4;      // output rows (weight rows) per block
constexpr int kMaxWarps = 8;  // warps per block splitting K
constexpr int kMaxM = 8;      // rows of x: one-token decoding of up to 8 sequences
constexpr int kMaxSegments = 4;  // out_scale segments (one-element scales) of a requantized output

// The requant scale of each output column: per column, or one per segment of columns (bound[i]: the first column of
// segment i + 1; unused bounds are INT_MAX).
struct OutScales {
  const float* s[kMaxSegments];
  int bound[kMaxSegments - 1];
  bool per_column;
};

__device__ __forceinline__ float out_scale_at(const OutScales& os, int n) {
  if (os.per_column) return os.s[0][n];
  // bounds increase (unused ones are INT_MAX): the last segment whose first column is <= n. Selects, not a runtime
  // index into the parameter struct (which would copy it to local memory: a stack frame and a load in the epilogue)
  const float* s = os.s[0];
  if (n >= os.bound[0]) s = os.s[1];
  if (n >= os.bound[1]) s = os.s[2];
  if (n >= os.bound[2]) s = os.s[3];
  return s[0];
}

// The conv update fused into the epilogue (w8a8_gemv_conv_update): the conv's channels are output columns [0, D).
struct ConvUpdate {
  int8_t* state;           // (M, D, K) int8 codes, updated in place
  int64_t ssb, ssd, ssk;   // its strides
  const int8_t* w;         // (D, K) contiguous taps
  int K, D;
  const float* w_scale;    // 1 or D
  bool w_per_channel;
  const float* bias;       // (D,) or nullptr
  bool silu;
  Outputs outs;            // (M, D) outputs, as conv1d_int8_update allocates them
};

template <typename T> __device__ __forceinline__ void store_out(T* p, float v);
template <> __device__ __forceinline__ void store_out<float>(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void store_out<at::Half>(at::Half* p, float v) {
  *reinterpret_cast<__half*>(p) = __float2half_rn(v);
}
template <> __device__ __forceinline__ void store_out<at::BFloat16>(at::BFloat16* p, float v) {
  *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
}

// MT: rows of x the kernel is compiled for (1, 2, 4, 8); M <= MT rows are real, the others re-read row 0 and are
// never stored. T: the activation dtype the output is rounded through (and stored in, unless REQUANT). CONV (REQUANT
// only): run the conv update of `conv` on the codes of columns [0, conv.D).
template <int MT, typename T, bool REQUANT, bool CONV>
__global__ void __launch_bounds__(kMaxWarps * 32, 2)  // <= 128 registers: no spills for 8 rows
w8a8_gemv_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w, int M, int N, int K,
                 const float* __restrict__ x_scale, const float* __restrict__ w_scale, bool w_per_channel,
                 const float* __restrict__ bias, const OutScales out_scale, void* __restrict__ out,
                 const ConvUpdate conv) {
  static_assert(REQUANT || !CONV, "the fused conv update reads the requantized codes");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int n0 = blockIdx.x * kRows;
  const int chunks = K >> 4;  // 16-byte chunks per row

  const int4* wrow[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {  // rows past N (last block) re-read row N - 1: no branch in the loop
    const int n = min(n0 + r, N - 1);
    wrow[r] = reinterpret_cast<const int4*>(w + static_cast<int64_t>(n) * K);
  }
  // the weights are read-only: this thread's first two 16-byte chunks of each row go to L2 before the prologue, while
  // the kernel before this one (whose output is x) may still be running (launch_overlapped)
  {
    const int c = warp * 32 + lane, step = warps * 32;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (c < chunks) asm volatile("prefetch.global.L2 [%0];" ::"l"(wrow[r] + c));
      if (c + step < chunks) asm volatile("prefetch.global.L2 [%0];" ::"l"(wrow[r] + c + step));
    }
  }
  kernel_prologue();  // see launch_overlapped (common/qmamba_common.cuh)
  // the epilogue's operands (scales, bias, the fused conv's state, taps and scales) do not depend on the sums: the
  // kRows * MT threads that run it load them now, so their round trips overlap the weight stream instead of following
  // it
  const int t = threadIdx.x;
  const int er = t / MT, em = t % MT, en = n0 + er;
  const bool epi = t < kRows * MT && en < N && em < M;
  float e_scale = 0.0f, e_bias = 0.0f, e_out_scale = 1.0f, e_inv = 0.0f;
  ConvChannel e_conv{};
  if (epi) {
    // __fmul_rn / __fadd_rn are never contracted into an FMA: the same two roundings as the torch reference
    e_scale = __fmul_rn(x_scale[0], w_scale[w_per_channel ? en : 0]);
    if (bias != nullptr) e_bias = bias[en];
    if constexpr (REQUANT) {
      e_out_scale = out_scale_at(out_scale, en);
      e_inv = __fdiv_rn(1.0f, e_out_scale);
    }
    if constexpr (CONV) {
      if (en < conv.D)
        e_conv = conv_channel_load(conv.state + em * conv.ssb + en * conv.ssd, conv.ssk, conv.w + en * conv.K, conv.K,
                                   conv.w_scale[conv.w_per_channel ? en : 0], conv.bias, en, conv.outs);
    }
  }
  const int4* xrow[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) xrow[m] = reinterpret_cast<const int4*>(x + static_cast<int64_t>(m < M ? m : 0) * K);

  int acc[kRows][MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0;

  const int step = warps * 32;
  int c = warp * 32 + lane;
  // two steps per iteration: all 2 * kRows weight loads are issued before the first dp4a waits on them
  for (; c + step < chunks; c += 2 * step) {
    int4 wa[kRows], wb[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      wa[r] = __ldcs(wrow[r] + c);  // streamed: each weight byte is read once per call
      wb[r] = __ldcs(wrow[r] + c + step);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int4 xa = __ldg(xrow[m] + c);  // x is re-read by every block: keep it in L1 / L2
      const int4 xb = __ldg(xrow[m] + c + step);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r][m] = dot16(wb[r], xb, dot16(wa[r], xa, acc[r][m]));
    }
  }
  if (c < chunks) {
    int4 wa[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) wa[r] = __ldcs(wrow[r] + c);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int4 xa = __ldg(xrow[m] + c);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r][m] = dot16(wa[r], xa, acc[r][m]);
    }
  }

  // integer sums: any reduction order gives the same result
  __shared__ int partial[kMaxWarps][kRows * MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      int v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) partial[warp][r * MT + m] = v;
    }
  __syncthreads();

  if (!epi) return;
  int total = 0;
  for (int i = 0; i < warps; ++i) total += partial[i][t];
  float v = __fmul_rn(__int2float_rn(total), e_scale);
  if (bias != nullptr) v = __fadd_rn(v, e_bias);
  const int64_t idx = static_cast<int64_t>(em) * N + en;
  if constexpr (REQUANT) {
    const int8_t q = quantize_rn(round_through<T>(v), e_inv);
    static_cast<int8_t*>(out)[idx] = q;
    if constexpr (CONV) {
      // columns [0, conv.D) are segment 0 (checked on the host): q is in the scale the conv reads its input in
      if (en < conv.D) {
        conv_channel_run<T>(e_conv, q, conv.state + em * conv.ssb + en * conv.ssd, conv.ssk, conv.K, e_out_scale,
                            conv.silu, conv.outs, static_cast<int64_t>(em) * conv.D + en);
      }
    }
  } else {
    store_out<T>(static_cast<T*>(out) + idx, v);
  }
}

int sm_count(int device) {
  static int cached[64] = {0};  // per device; a race only writes the same value twice
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cached[device] = sms;
  }
  return cached[device];
}

template <int MT, typename T>
void launch(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
            const float* bias, const OutScales* out_scale, const ConvUpdate* conv, at::Tensor& out, int warps,
            cudaStream_t stream) {
  const int M = x.size(0), K = x.size(1), N = w.size(0);
  const dim3 grid((N + kRows - 1) / kRows), block(warps * 32);
  const bool per_channel = w_scale.numel() > 1;
  const OutScales none{};
  const ConvUpdate no_conv{};
  if (conv != nullptr) {
    launch_overlapped(w8a8_gemv_kernel<MT, T, true, true>, grid, block, 0, stream,
        x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, K, x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
        per_channel, bias, *out_scale, out.data_ptr(), *conv);
  } else if (out_scale != nullptr) {
    launch_overlapped(w8a8_gemv_kernel<MT, T, true, false>, grid, block, 0, stream,
        x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, K, x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
        per_channel, bias, *out_scale, out.data_ptr(), no_conv);
  } else {
    launch_overlapped(w8a8_gemv_kernel<MT, T, false, false>, grid, block, 0, stream,
        x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, K, x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
        per_channel, bias, none, out.data_ptr(), no_conv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_m(int M, const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
              const float* bias, const OutScales* out_scale, const ConvUpdate* conv, at::Tensor& out, int warps,
              cudaStream_t stream) {
  if (M <= 1) launch<1, T>(x, x_scale, w, w_scale, bias, out_scale, conv, out, warps, stream);
  else if (M <= 2) launch<2, T>(x, x_scale, w, w_scale, bias, out_scale, conv, out, warps, stream);
  else if (M <= 4) launch<4, T>(x, x_scale, w, w_scale, bias, out_scale, conv, out, warps, stream);
  else launch<8, T>(x, x_scale, w, w_scale, bias, out_scale, conv, out, warps, stream);
}

// The GEMV's checks and launch, for op `op`; conv: the fused conv update (its arguments checked by the caller), or
// nullptr.
at::Tensor gemv(const char* op, const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                at::TensorList out_scale, at::IntArrayRef out_bounds, const ConvUpdate* conv) {
  QMAMBA_CHECK_CUDA(x);
  QMAMBA_CHECK_CUDA(w);
  QMAMBA_CHECK_DTYPE(x, at::kChar);
  QMAMBA_CHECK_DTYPE(w, at::kChar);
  QMAMBA_CHECK(x.dim() == 2 && w.dim() == 2, op, ": x must be (M, K) and w (N, K), got ", x.sizes(), " and ",
               w.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  QMAMBA_CHECK(w.size(1) == K, op, ": x has K=", K, " columns but w is ", w.sizes(), " (expected (N, K))");
  QMAMBA_CHECK(M >= 1 && M <= kMaxM, op, ": x must have 1..", kMaxM, " rows (tokens), got ", M,
               "; use the GEMM (qmamba.kernels.linear.w8a8_gemm) for more");
  QMAMBA_CHECK(K % 16 == 0, op, ": K=", K, " must be a multiple of 16 (16-byte weight loads); use the GEMM "
               "(qmamba.kernels.linear.w8a8_gemm) or pad K");
  QMAMBA_CHECK(x.is_contiguous() && w.is_contiguous(), op, ": x and w must be contiguous (call .contiguous())");
  QMAMBA_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
               op, ": x and w must start at 16-byte aligned addresses (clone a view at an odd offset)");
  // the int32 accumulator holds K products of at most 128 * 128 (DESIGN §3: split larger reductions)
  QMAMBA_CHECK(K * 128 * 128 < (int64_t(1) << 31) && N < (int64_t(1) << 31),
               op, ": K=", K, " could overflow the int32 accumulator (needs K < 131072)");
  QMAMBA_CHECK_SCALAR_SCALE(x_scale);
  QMAMBA_CHECK(w_scale.is_cuda() && w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
               (w_scale.numel() == 1 || w_scale.numel() == N),
               op, ": w_scale must be a contiguous float32 CUDA tensor of 1 (per-tensor) or N=", N,
               " (per-output-channel) elements, got ", w_scale.sizes(), " ", w_scale.scalar_type());
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    QMAMBA_CHECK(b.is_cuda() && b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == N,
                 op, ": bias must be a contiguous float32 CUDA tensor of N=", N, " elements (pass bias.float())");
    bias_ptr = b.data_ptr<float>();
  }
  OutScales scales{};
  const OutScales* out_scale_ptr = nullptr;
  if (!out_scale.empty()) {  // empty: the float output
    const at::TensorList ss = out_scale;
    const int64_t segs = static_cast<int64_t>(ss.size());
    QMAMBA_CHECK(segs <= kMaxSegments && static_cast<int64_t>(out_bounds.size()) == segs - 1,
                 op, ": out_scale must be 1..", kMaxSegments, " tensors with one column bound between each two, "
                 "got ", segs, " scales and ", out_bounds.size(), " bounds");
    scales.per_column = segs == 1 && N > 1 && ss[0].numel() == N;
    for (int64_t i = 0; i < segs; ++i) {
      const at::Tensor& t = ss[i];
      QMAMBA_CHECK(t.is_cuda() && t.device() == x.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                       (t.numel() == 1 || (scales.per_column && t.numel() == N)),
                   op, ": out_scale must be one contiguous float32 tensor of N=", N, " elements (one scale per "
                   "output column) or one-element float32 tensors (one per segment of columns), on ", x.device());
      scales.s[i] = t.data_ptr<float>();
    }
    for (int64_t i = segs; i < kMaxSegments; ++i) scales.s[i] = scales.s[0];
    int64_t prev = 0;
    for (int i = 0; i < kMaxSegments - 1; ++i) {
      const int64_t b = i < segs - 1 ? out_bounds[i] : INT_MAX;
      QMAMBA_CHECK(i >= segs - 1 || (b > prev && b < N), op, ": out_bounds must increase strictly within "
                   "(0, N=", N, "), got ", out_bounds);
      scales.bound[i] = static_cast<int>(b);
      prev = b;
    }
    out_scale_ptr = &scales;
  }
  QMAMBA_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
               op, ": out_dtype must be float32, float16 or bfloat16 (the activation dtype), got ", out_dtype);
  for (const at::Tensor* t : {&x_scale, &w, &w_scale}) {
    QMAMBA_CHECK(t->device() == x.device(), op, ": all tensors must be on ", x.device(), ", got one on ",
                 t->device());
  }

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_scale_ptr != nullptr ? at::kChar : out_dtype));
  if (N == 0) return out;

  // Warps per block: enough resident warps to keep ~16 per SM streaming (latency hiding), but no more than the
  // 16-byte chunks of a row can feed. Depends on shapes only, so CUDA graph replays launch the same grid.
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t chunks = K / 16;
  const int64_t want = (16 * static_cast<int64_t>(sm_count(x.get_device())) + blocks - 1) / blocks;
  int warps = static_cast<int>(std::min<int64_t>(std::max<int64_t>(want, 1), kMaxWarps));
  warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(warps, chunks / 32)));

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int m = static_cast<int>(M);
  auto run = [&](auto tag) {
    launch_m<decltype(tag)>(m, x, x_scale, w, w_scale, bias_ptr, out_scale_ptr, conv, out, warps, stream);
  };
  switch (out_dtype) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  return out;
}

at::Tensor w8a8_gemv(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                     at::TensorList out_scale, at::IntArrayRef out_bounds) {
  return gemv("w8a8_gemv", x, x_scale, w, w_scale, bias, out_dtype, out_scale, out_bounds, nullptr);
}

// w8a8_gemv with the conv1d update of its first conv_columns columns fused (see the top of this file): returns the
// GEMV's codes (M, N) int8 (all segments), then the conv's outputs as conv1d_int8_update returns them.
std::vector<at::Tensor> w8a8_gemv_conv_update(
    const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
    const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, at::TensorList out_scale,
    at::IntArrayRef out_bounds, int64_t conv_columns, const at::Tensor& conv_state, const at::Tensor& conv_w,
    const at::Tensor& conv_w_scale, const std::optional<at::Tensor>& conv_bias, bool silu,
    at::TensorList conv_out_scales, int64_t dual_index, int64_t dual_encoding, int64_t dual_knee,
    const std::optional<at::Tensor>& dual_outlier_scale) {
  const char* op = "w8a8_gemv_conv_update";
  QMAMBA_CHECK_CUDA(x);
  QMAMBA_CHECK(x.dim() == 2 && w.dim() == 2, op, ": x must be (M, K) and w (N, K), got ", x.sizes(), " and ",
               w.sizes());
  const int64_t M = x.size(0), N = w.size(0);
  // the conv reads its input in segment 0's scale: the segment must be the conv's columns, one one-element scale
  QMAMBA_CHECK(!out_scale.empty() && out_scale[0].numel() == 1, op, ": out_scale must be one one-element scale per "
               "segment of columns, the first the conv input's (the fused conv reads the requantized codes)");
  const int64_t first = out_bounds.empty() ? N : out_bounds[0];
  QMAMBA_CHECK(conv_columns >= 1 && conv_columns == first, op, ": conv_columns (", conv_columns, ") must be the "
               "column count of the first out_scale segment (", first, "): the conv's input is that segment");
  const int64_t D = conv_columns;
  ConvArgs a = check_conv_args(op, x, D, out_scale[0], conv_w, conv_w_scale, conv_bias, out_dtype, conv_out_scales);
  check_conv_state(op, conv_state, x, M, D, a.K, "M");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  std::vector<at::Tensor> conv_results;
  ConvUpdate conv{};
  conv.outs = make_conv_outputs(op, x, out_dtype, conv_out_scales, dual_index, dual_encoding, dual_knee,
                                dual_outlier_scale, {M, D}, {M, D}, /*transpose12=*/false, conv_results);
  conv.state = conv_state.data_ptr<int8_t>();
  conv.ssb = conv_state.stride(0);
  conv.ssd = conv_state.stride(1);
  conv.ssk = conv_state.stride(2);
  conv.w = a.w.data_ptr<int8_t>();
  conv.K = a.K;
  conv.D = static_cast<int>(D);
  conv.w_scale = conv_w_scale.data_ptr<float>();
  conv.w_per_channel = a.w_per_channel;
  conv.bias = conv_bias.has_value() ? conv_bias->data_ptr<float>() : nullptr;
  conv.silu = silu;
  std::vector<at::Tensor> results{gemv(op, x, x_scale, w, w_scale, bias, out_dtype, out_scale, out_bounds, &conv)};
  results.insert(results.end(), conv_results.begin(), conv_results.end());
  return results;
}

}  // namespace
}  // namespace qmamba

TORCH_LIBRARY_FRAGMENT(qmamba, m) {
  m.def("w8a8_gemv(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
        "Tensor[] out_scale, int[] out_bounds) -> Tensor");
  m.def("w8a8_gemv_conv_update(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype, Tensor[] out_scale, int[] out_bounds, int conv_columns, Tensor(a!) conv_state, "
        "Tensor conv_w, Tensor conv_w_scale, Tensor? conv_bias, bool silu, Tensor[] conv_out_scales, "
        "int dual_index, int dual_encoding, int dual_knee, Tensor? dual_outlier_scale) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(qmamba, CUDA, m) {
  m.impl("w8a8_gemv", &qmamba::w8a8_gemv);
  m.impl("w8a8_gemv_conv_update", &qmamba::w8a8_gemv_conv_update);
}
