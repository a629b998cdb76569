// Activation quantization in one kernel: the int8 codes of a float tensor, per-tensor or per-channel along one axis.
// Torch twin: qmamba/ops/int8_quantize.py (quantize_int8_ref) = qmamba.quant.numerics.quantize, op for op:
//
//   v     = float(x)                       exact upcast of fp32 / fp16 / bf16
//   inv   = 1.0f / scale[c]                IEEE fp32 division (no fast math), c = the channel (0 when per-tensor)
//   codes = clamp(rint(v * inv), qmin, qmax)     the product rounded to fp32 first (__fmul_rn: no FMA can absorb
//                                                it), then round half to even (__float2int_rn), qmin / qmax =
//                                                -(2^(bits-1)), 2^(bits-1) - 1
//
// Codes are bit-identical to torch's (torch computes the same fp32 product and rounds it the same way; a product
// beyond the int range saturates here and clamps there: the same code). torch spends ~5 kernels on this; decode
// runs ~9 of them per layer, so one launch each matters inside the CUDA graph of a step.
//
// Layout: the output is contiguous (x's shape). x is read as (rows, width) with strides (row_stride, 1) where its
// trailing contiguous dims form a row and its leading dims step by one stride (a contiguous tensor: one row; a slice
// x[..., a:b] or a chunk of a wider projection: many rows); any other layout is copied to contiguous first.
// 16-byte loads where x's address, width and row stride allow them, else one element per load.
#include "common/qmamba_common.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace qmamba {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride beyond: 2M threads keep any GPU's memory system busy

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };
template <int N> struct alignas(N) Codes { int8_t q[N]; };

__device__ __forceinline__ int8_t code_of(float v, float inv, int qmin, int qmax) {
  int q = __float2int_rn(__fmul_rn(v, inv));
  q = q < qmin ? qmin : (q > qmax ? qmax : q);
  return static_cast<int8_t>(q);
}

// Where element i (x's logical, row-major index) is read from.
template <typename Idx>
__device__ __forceinline__ Idx source_of(Idx i, Idx width, Idx row_stride) {
  if (row_stride == width) return i;  // contiguous (uniform across the grid)
  const Idx row = i / width;
  return row * row_stride + (i - row * width);
}

// The channel of consecutive elements i, i + 1, ...: c = (i / inner) % channels, advanced without dividing again.
template <typename Idx>
struct ChannelCursor {
  Idx k, c;  // position inside the channel's run of `inner` elements, channel
  __device__ __forceinline__ ChannelCursor(Idx i, Idx inner, Idx channels) {
    const Idx r = i / inner;
    k = i - r * inner;
    c = r % channels;
  }
  __device__ __forceinline__ void next(Idx inner, Idx channels) {
    if (++k == inner) {
      k = 0;
      if (++c == channels) c = 0;
    }
  }
};

// x: n elements read as described above; scale: 1 (per-tensor) or `channels` fp32 values; out: n contiguous codes.
// VEC elements per load (VEC > 1 only where every vector is 16-byte aligned and inside one row); the n % VEC
// elements after the last full vector are done one each by the first threads of the grid.
template <typename T, int VEC, bool PER_CHANNEL, typename Idx>
__global__ void __launch_bounds__(kThreads) quantize_int8_kernel(
    const T* __restrict__ x, const float* __restrict__ scale, int8_t* __restrict__ out, Idx n, Idx width,
    Idx row_stride, Idx inner, Idx channels, int qmin, int qmax) {
  kernel_prologue();  // first: see launch_overlapped (common/qmamba_common.cuh)
  const Idx nvec = n / VEC;
  const Idx step = static_cast<Idx>(gridDim.x) * kThreads;
  const Idx first = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x;
  float inv = 0.0f;
  Idx cached = channels;  // the channel whose 1 / scale is in inv (none yet)
  if (!PER_CHANNEL) inv = 1.0f / __ldg(scale);

  for (Idx v = first; v < nvec; v += step) {
    const Idx i = v * VEC;
    const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(x + source_of(i, width, row_stride));
    Codes<VEC> q;
    if (PER_CHANNEL) {
      ChannelCursor<Idx> cur(i, inner, channels);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (cur.c != cached) {
          cached = cur.c;
          inv = 1.0f / __ldg(scale + cur.c);
        }
        q.q[j] = code_of(static_cast<float>(p.v[j]), inv, qmin, qmax);
        cur.next(inner, channels);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) q.q[j] = code_of(static_cast<float>(p.v[j]), inv, qmin, qmax);
    }
    *reinterpret_cast<Codes<VEC>*>(out + i) = q;
  }

  if (VEC > 1) {  // the tail
    const Idx i = nvec * VEC + first;
    if (i < n) {
      if (PER_CHANNEL) inv = 1.0f / __ldg(scale + (i / inner) % channels);
      out[i] = code_of(static_cast<float>(x[source_of(i, width, row_stride)]), inv, qmin, qmax);
    }
  }
}

// x as (rows, width) with strides (row_stride, 1): the trailing dims whose strides are those of a contiguous block
// form a row, the remaining (size > 1) dims must step by one stride. False for any other layout.
bool row_layout(const at::Tensor& x, int64_t& width, int64_t& row_stride) {
  int64_t w = 1;
  int64_t d = x.dim() - 1;
  for (; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != w) break;
    w *= x.size(d);
  }
  if (d < 0) {  // contiguous
    width = row_stride = x.numel();
    return true;
  }
  const int64_t rs = x.stride(d);
  int64_t expected = rs * x.size(d);
  for (--d; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  width = w;
  row_stride = rs;
  return true;
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: QMAMBA_CHECK(false, "quantize_int8: x must be float32, float16 or bfloat16, got ", t);
  }
}

at::Tensor quantize_int8(const at::Tensor& x, const at::Tensor& scale, int64_t axis, int64_t bits) {
  // Backstop checks: qmamba/kernels/quantize.py checks all of this in Python first.
  QMAMBA_CHECK_CUDA(x);
  QMAMBA_CHECK(bits >= 2 && bits <= 8, "quantize_int8: bits must be in 2..8, got ", bits);
  QMAMBA_CHECK(scale.is_cuda() && scale.device() == x.device() && scale.scalar_type() == at::kFloat,
               "quantize_int8: scale must be a float32 tensor on ", x.device(), ", got ", scale.scalar_type(), " on ",
               scale.device());
  const int64_t n_scale = scale.numel();
  const bool per_channel = n_scale != 1;
  int64_t channels = 1, inner = 1;
  if (per_channel) {
    const int64_t nd = x.dim();
    QMAMBA_CHECK(nd >= 1 && axis >= -nd && axis < nd, "quantize_int8: axis ", axis, " is out of range for x of shape ",
                 x.sizes());
    const int64_t a = axis < 0 ? axis + nd : axis;
    channels = x.size(a);
    QMAMBA_CHECK(n_scale == channels, "quantize_int8: scale must have 1 (per-tensor) or x.shape[", axis, "] = ",
                 channels, " (per-channel) elements, got ", n_scale);
    for (int64_t d = a + 1; d < nd; ++d) inner *= x.size(d);
  }

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const int64_t n = x.numel();
  if (n == 0) return out;

  int64_t width = n, row_stride = n;
  at::Tensor src = x;
  if (!row_layout(x, width, row_stride)) {
    src = x.contiguous();
    width = row_stride = n;
  }
  const at::Tensor s = scale.contiguous();
  const int64_t rows = n / width;
  const int64_t span = (rows - 1) * row_stride + width;  // elements from the first one read to past the last
  const bool small = std::max(n, span) < (int64_t(1) << 31) && n_scale < (int64_t(1) << 31);
  const int qmax = (1 << (bits - 1)) - 1, qmin = -(1 << (bits - 1));
  const auto stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = src.data_ptr<T>();
    const bool vec = reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                     (row_stride == width || (width % kVec == 0 && row_stride % kVec == 0));
    const int64_t work = vec ? std::max<int64_t>(n / kVec, n % kVec) : n;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
    auto launch = [&](auto vec_tag, auto pc_tag, auto idx_tag) {
      constexpr int V = decltype(vec_tag)::value;
      constexpr bool PC = decltype(pc_tag)::value;
      using Idx = decltype(idx_tag);
      launch_overlapped(quantize_int8_kernel<T, V, PC, Idx>, dim3(blocks), dim3(kThreads), 0, stream,
          xp, s.data_ptr<float>(), out.data_ptr<int8_t>(), static_cast<Idx>(n), static_cast<Idx>(width),
          static_cast<Idx>(row_stride), static_cast<Idx>(inner), static_cast<Idx>(channels), qmin, qmax);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_index = [&](auto vec_tag, auto pc_tag) {
      if (small) {
        launch(vec_tag, pc_tag, uint32_t{});
      } else {
        launch(vec_tag, pc_tag, uint64_t{});
      }
    };
    auto by_channel = [&](auto vec_tag) {
      if (per_channel) {
        by_index(vec_tag, std::true_type{});
      } else {
        by_index(vec_tag, std::false_type{});
      }
    };
    if (vec) {
      by_channel(std::integral_constant<int, kVec>{});
    } else {
      by_channel(std::integral_constant<int, 1>{});
    }
  });
  return out;
}

}  // namespace
}  // namespace qmamba

TORCH_LIBRARY_FRAGMENT(qmamba, m) { m.def("quantize_int8(Tensor x, Tensor scale, int axis, int bits) -> Tensor"); }

TORCH_LIBRARY_IMPL(qmamba, CUDA, m) { m.impl("quantize_int8", &qmamba::quantize_int8); }
