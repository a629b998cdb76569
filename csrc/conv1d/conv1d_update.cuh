// The int8 conv1d one-token update of one (sequence, channel), as a device function: the one copy of its math, used
// by conv1d_int8_update_kernel (conv1d/conv1d_int8.cu: one thread per (b, d)) and by the W8A8 GEMV's epilogue with the
// conv update fused (linear/gemv_int8.cu: the thread that makes the conv-input code of (row m, column n) runs the
// update of channel n of sequence m with it). Torch twin: qmamba.ops.int8_conv1d.conv1d_int8_update_ref.
//
//   state[0..K-2] = state[1..K-1], state[K-1] = x               in place (int8, any strides)
//   acc = sum_{i<K} w[c, i] * state[i]                           int32
//   v   = acc * (s_x * s_w[c]) (+ bias[c]), silu(v), round_through<T>(v)
//   out = v in T, or one code per single-scale consumer, and the dual-scale consumer's code (+ its flag byte)
#pragma once

#include "common/qmamba_common.cuh"

#include <vector>

namespace qmamba {
namespace {

constexpr int kMaxTaps = 4;  // d_conv of every Mamba model; shorter kernels are left-padded with zero taps
constexpr int kMaxOuts = 4;  // int8 consumers of one conv output (Mamba1's u feeds two)

// Where the results go: one float output (n_codes == 0), or n_codes int8 outputs with their per-tensor scales.
// The dual-scale output has fields of its own (never indexed at run time: a runtime index into the kernel's parameter
// struct would copy it to local memory).
struct Outputs {
  void* out[kMaxOuts];
  const float* scale[kMaxOuts];
  int n_codes;            // single-scale int8 outputs in out[] (0 and no dual output: one float output in out[0])
  int8_t* dual_out;       // the dual-scale output's codes, or nullptr
  const float* dual_s_in;
  const float* dual_s_out;
  int dual_enc, dual_knee;
  uint8_t* mask;          // its packed flags (mask encoding), else nullptr: prefill (B, ceil(L / 8), D), update (B, D)
};

// acc -> the float output rounded through T, in the torch twin's op order. __fmul_rn / __fadd_rn keep nvcc from
// fusing the multiply and the bias add into one FMA, which torch (two kernels) never does.
template <typename T>
__device__ __forceinline__ float epilogue(int acc, float scale, float bias, bool has_bias, bool silu_on) {
  float v = __fmul_rn(static_cast<float>(acc), scale);
  if (has_bias) v = __fadd_rn(v, bias);
  if (silu_on) v = silu(v);
  return round_through<T>(v);
}

// The update of channel c of one sequence in two parts, so a caller can issue every load the update needs before the
// work that makes its new input (the GEMV's dot products) and wait on none of them after it:
//   conv_channel_load: the state's codes 1..K-1 (`s`, stride ssk), the K taps `wc`, the weight scale `w_scale`, the
//                      bias (D floats, or nullptr), and the output scales' reciprocals;
//   conv_channel_run:  shift the state in place with the new input code `xnew`, the K-tap sum, the epilogue, and the
//                      outputs at element `idx` of each (B, D) output (`x_scale`: the input's per-tensor scale).
// conv1d_int8_update_kernel runs the two back to back: one copy of the math.
static_assert(kMaxTaps == 4, "a conv window is packed into one 32-bit word (__dp4a)");

struct ConvChannel {
  int win;    // the window's codes, right-aligned in bytes (byte j holds state code j - (kMaxTaps - K) + 1; byte
              // kMaxTaps - 1 the new input, filled by conv_channel_run), zero-padded on the left
  int taps;   // the taps, right-aligned the same way (byte j = w[c, j - (kMaxTaps - K)]), zero-padded
  float w_scale, bias;               // bias: 0 where the conv has none (has_bias false)
  bool has_bias;
  float out_inv[kMaxOuts];           // 1 / scale of each single-scale code output
  float dual_s_in, dual_in_inv, dual_out_inv;
};

__device__ __forceinline__ ConvChannel conv_channel_load(const int8_t* s, int64_t ssk, const int8_t* wc, int K,
                                                         float w_scale, const float* bias, int c,
                                                         const Outputs& outs) {
  ConvChannel ch{};
  unsigned win = 0, taps = 0;
#pragma unroll
  for (int j = 0; j < kMaxTaps; ++j) {
    const int i = j - (kMaxTaps - K);
    if (i >= 0) {
      taps |= static_cast<unsigned>(static_cast<uint8_t>(wc[i])) << (8 * j);
      if (i < K - 1) win |= static_cast<unsigned>(static_cast<uint8_t>(s[(i + 1) * ssk])) << (8 * j);
    }
  }
  ch.win = static_cast<int>(win);
  ch.taps = static_cast<int>(taps);
  ch.w_scale = w_scale;
  ch.has_bias = bias != nullptr;
  ch.bias = ch.has_bias ? bias[c] : 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxOuts; ++j) ch.out_inv[j] = j < outs.n_codes ? 1.0f / *outs.scale[j] : 0.0f;
  if (outs.dual_out != nullptr) {
    ch.dual_s_in = *outs.dual_s_in;
    ch.dual_in_inv = 1.0f / ch.dual_s_in;
    ch.dual_out_inv = 1.0f / *outs.dual_s_out;
  }
  return ch;
}

// The byte j of a packed window as a signed code.
__device__ __forceinline__ int8_t win_byte(int packed, int j) { return static_cast<int8_t>(packed >> (8 * j)); }

template <typename T>
__device__ __forceinline__ void conv_channel_run(const ConvChannel& ch, int8_t xnew, int8_t* s, int64_t ssk, int K,
                                                 float x_scale, bool silu_on, const Outputs& outs, int64_t idx) {
  const int win = (ch.win & 0x00ffffff) | (static_cast<int>(static_cast<uint8_t>(xnew)) << 24);
#pragma unroll
  for (int j = 0; j < kMaxTaps; ++j) {
    const int i = j - (kMaxTaps - K);
    if (i >= 0) s[i * ssk] = win_byte(win, j);
  }
  const int acc = __dp4a(ch.taps, win, 0);  // zero taps on the left: the K-tap sum, exact in int32
  const float scale = __fmul_rn(x_scale, ch.w_scale);
  const float v = epilogue<T>(acc, scale, ch.bias, ch.has_bias, silu_on);
  if (outs.n_codes == 0 && outs.dual_out == nullptr) {
    static_cast<T*>(outs.out[0])[idx] = static_cast<T>(v);
    return;
  }
#pragma unroll
  for (int j = 0; j < kMaxOuts; ++j)
    if (j < outs.n_codes) static_cast<int8_t*>(outs.out[j])[idx] = quantize_rn(v, ch.out_inv[j]);
  if (outs.dual_out != nullptr) {
    bool flag = false;
    outs.dual_out[idx] = dual_encode(v, outs.dual_enc, outs.dual_knee, ch.dual_s_in, ch.dual_in_inv, ch.dual_out_inv,
                                     flag);
    if (outs.mask != nullptr) outs.mask[idx] = static_cast<uint8_t>(flag);
  }
}

// ---- host side shared by the conv ops and the GEMV that fuses the update: the conv's argument checks and its
// outputs, so both ops take and return the conv's part the same way.

struct ConvArgs {
  at::Tensor w;  // (D, K) contiguous
  int K;
  bool w_per_channel;
};

// Checks shared by prefill and update; returns the weight as (D, K) contiguous.
ConvArgs check_conv_args(const char* op, const at::Tensor& x, int64_t D, const at::Tensor& x_scale,
                         const at::Tensor& w, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                         at::ScalarType out_dtype, at::TensorList out_scales) {
  QMAMBA_CHECK_CUDA(x);
  QMAMBA_CHECK(x.scalar_type() == at::kChar, op, ": x must be int8 codes (quantize the conv input first), got ",
               x.scalar_type());
  const auto dev = x.device();
  QMAMBA_CHECK_SCALAR_SCALE(x_scale);
  QMAMBA_CHECK(w.is_cuda() && w.scalar_type() == at::kChar && w.dim() >= 2 && w.size(0) == D,
               op, ": w must be int8 CUDA weight codes (D, K) or (D, 1, K) with D = ", D, ", got ", w.sizes());
  const int64_t K = w.size(-1);
  QMAMBA_CHECK(w.numel() == D * K, op, ": w must be (D, K) or (D, 1, K), got ", w.sizes());
  QMAMBA_CHECK(K >= 1 && K <= kMaxTaps, op, ": the kernel supports 1 <= K <= ", kMaxTaps, " taps (d_conv), got K = ",
               K, "; use backend='torch' for longer convolutions");
  QMAMBA_CHECK(w_scale.is_cuda() && w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                   (w_scale.numel() == 1 || w_scale.numel() == D),
               op, ": w_scale must be a contiguous float32 CUDA tensor of 1 (per-tensor) or D = ", D,
               " (per-channel) elements, got ", w_scale.scalar_type(), " ", w_scale.sizes());
  if (bias.has_value()) {
    const auto& bt = *bias;
    QMAMBA_CHECK(bt.is_cuda() && bt.scalar_type() == at::kFloat && bt.is_contiguous() && bt.numel() == D,
                 op, ": bias must be a contiguous float32 CUDA tensor of D = ", D, " elements, got ", bt.scalar_type(),
                 " ", bt.sizes(), " (the Python wrapper converts it)");
    QMAMBA_CHECK(bt.device() == dev, op, ": bias is on ", bt.device(), " but x is on ", dev);
  }
  QMAMBA_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
               op, ": out_dtype must be float32, float16 or bfloat16 (the activation dtype), got ", out_dtype);
  QMAMBA_CHECK(out_scales.size() <= static_cast<size_t>(kMaxOuts), op, ": at most ", kMaxOuts,
               " out_scales (int8 consumers), got ", out_scales.size());
  for (const auto& s : out_scales) {
    QMAMBA_CHECK_SCALAR_SCALE(s);
    QMAMBA_CHECK(s.device() == dev, op, ": an out_scale is on ", s.device(), " but x is on ", dev);
  }
  QMAMBA_CHECK(x_scale.device() == dev && w.device() == dev && w_scale.device() == dev,
               op, ": x, x_scale, w and w_scale must be on one device");
  return {w.reshape({D, K}).contiguous(), static_cast<int>(K), w_scale.numel() == D && D != 1};
}

// The conv's decode state: int8 CUDA codes (rows, D, K) on x's device, within the kernels' int32 indexing.
void check_conv_state(const char* op, const at::Tensor& conv_state, const at::Tensor& x, int64_t rows, int64_t D,
                      int K, const char* rows_name) {
  QMAMBA_CHECK(conv_state.is_cuda() && conv_state.scalar_type() == at::kChar && conv_state.dim() == 3 &&
                   conv_state.size(0) == rows && conv_state.size(1) == D && conv_state.size(2) == K,
               op, ": conv_state must be int8 CUDA codes (", rows_name, ", D, K) = (", rows, ", ", D, ", ", K,
               "), got ", conv_state.scalar_type(), " ", conv_state.sizes(),
               "; build it with qmamba.ops.int8_conv1d.conv1d_int8_initial_state");
  QMAMBA_CHECK(conv_state.device() == x.device(), op, ": conv_state is on ", conv_state.device(), " but x is on ",
               x.device());
  QMAMBA_CHECK(rows * D < (int64_t(1) << 31), op, ": ", rows_name, " * D = ", rows * D, " is too large");
}

// Allocate the outputs, each an empty tensor of `alloc_shape` (transposed 1 <-> 2 for the channel-last prefill
// layout), in the order of out_scales, and point the kernel's Outputs at them. Output `dual_index` (>= 0), if any, is
// dual-scale (issue 5): `dual_encoding` (1 mask, 2 piecewise) with outlier scale `dual_outlier_scale`; the mask
// encoding appends its packed flags to `results`, allocated as `mask_shape` (transposed likewise), left unfilled: the
// kernels write every byte.
Outputs make_conv_outputs(const char* op, const at::Tensor& x, at::ScalarType out_dtype, at::TensorList out_scales,
                          int64_t dual_index, int64_t dual_encoding, int64_t dual_knee,
                          const std::optional<at::Tensor>& dual_outlier_scale, at::IntArrayRef alloc_shape,
                          at::IntArrayRef mask_shape, bool transpose12, std::vector<at::Tensor>& results) {
  const int64_t n = static_cast<int64_t>(out_scales.size());
  if (dual_index < 0) {
    QMAMBA_CHECK(!dual_outlier_scale.has_value(), op, ": dual_outlier_scale given without a dual_index");
  } else {
    QMAMBA_CHECK(dual_index < n, op, ": dual_index ", dual_index, " names no output (", n, " out_scales)");
    QMAMBA_CHECK(dual_encoding == kEncMask || dual_encoding == kEncPiecewise, op,
                 ": dual_encoding must be 1 (mask) or 2 (piecewise), got ", dual_encoding);
    QMAMBA_CHECK(dual_encoding != kEncPiecewise || (dual_knee >= 1 && dual_knee <= 126), op,
                 ": the piecewise knee must be in 1..126, got ", dual_knee);
    QMAMBA_CHECK(dual_outlier_scale.has_value(), op, ": a dual-scale output needs dual_outlier_scale");
    QMAMBA_CHECK_SCALAR_SCALE(*dual_outlier_scale);
    QMAMBA_CHECK(dual_outlier_scale->device() == x.device(), op, ": dual_outlier_scale must be on x's device");
  }
  Outputs outs{};
  const auto opts = x.options();
  auto alloc = [&](at::ScalarType dt, at::IntArrayRef shape, bool zero) {
    at::Tensor t = zero ? at::zeros(shape, opts.dtype(dt)) : at::empty(shape, opts.dtype(dt));
    results.push_back(transpose12 ? t.transpose(1, 2) : t);
    return t.data_ptr();
  };
  outs.n_codes = 0;
  if (n == 0) {
    outs.out[0] = alloc(out_dtype, alloc_shape, false);
    return outs;
  }
  for (int64_t j = 0; j < n; ++j) {
    void* ptr = alloc(at::kChar, alloc_shape, false);
    if (j == dual_index) {
      outs.dual_out = static_cast<int8_t*>(ptr);
      outs.dual_s_in = out_scales[j].data_ptr<float>();
    } else {
      outs.out[outs.n_codes] = ptr;
      outs.scale[outs.n_codes] = out_scales[j].data_ptr<float>();
      ++outs.n_codes;
    }
  }
  if (dual_index >= 0) {
    outs.dual_s_out = dual_outlier_scale->data_ptr<float>();
    outs.dual_enc = static_cast<int>(dual_encoding);
    outs.dual_knee = static_cast<int>(dual_knee);
    // every byte is written by the kernel (steps past L as 0 bits), so no fill is needed
    if (dual_encoding == kEncMask) outs.mask = static_cast<uint8_t*>(alloc(at::kByte, mask_shape, false));
  }
  return outs;
}

}  // namespace
}  // namespace qmamba
