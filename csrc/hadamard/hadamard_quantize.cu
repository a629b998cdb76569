// Fused Hadamard rotation + int8 quantize: the int8 codes of a rotated linear's input (Quamba's out_proj) in one
// kernel. Torch twin: qmamba/ops/int8_hadamard.py (hadamard_quantize_ref) = quantize(hadamard_transform(x), scale):
//
//   y     = x (row block of b elements) upcast to fp32                 exact
//   for h = 1, 2, 4, ..., b/2:  (y[i], y[i+h]) -> (y[i] + y[i+h], y[i] - y[i+h])   for i with (i & h) == 0
//   v     = y * c,  c = (float)(1.0 / sqrt(b))                          torch multiplies by the Python double
//                                                                       1/sqrt(b) converted to an fp32 scalar
//   codes = clamp(rint(v * (1.0f / scale)), qmin, qmax)
//
// b is the largest power of two dividing the row width n (n / b independent blocks per row). Every add / subtract /
// multiply is one separately rounded fp32 op in torch's order (the butterfly order above is the only order: each
// stage's pairs are independent), so the codes are bit-identical to the twin's.
//
// Layout: one group of b / E threads per Hadamard block, E consecutive elements per thread in registers (E = 8 up to
// b = 2048, 16 up to 8192). Stages h < E run inside a thread, E <= h < 32 E across lanes (warp shuffles), and the
// remaining h (the warp-index bits, W = threads / 32 <= E warps) after one round trip through shared memory in which
// each thread takes whole groups of W elements spaced 32 E apart. Blocks of fewer than 32 threads share a CTA.
#include "common/qmamba_common.cuh"
#include "hadamard/hadamard_block.cuh"

namespace qmamba {
namespace {

// x: rows of n = nblocks * b elements, row stride row_stride (elements), last dim contiguous. out: (rows, n) int8,
// contiguous, so Hadamard block g starts at out + g * b. Each CTA handles blockDim.x / tpb blocks (tpb = b / E threads
// per block; more than one only when tpb < 32).
template <typename T, int E>
__global__ void __launch_bounds__(1024) hadamard_quantize_kernel(
    const T* __restrict__ x, int64_t row_stride, int nblocks, int log_b, int64_t total, float rsqrt_b,
    const float* __restrict__ scale, int qmin, int qmax, bool vec, int8_t* __restrict__ out) {
  kernel_prologue();  // first: see launch_overlapped (common/qmamba_common.cuh)
  const float inv = __fdiv_rn(1.0f, *scale);  // loaded with the row, not after the butterflies
  __shared__ float smem[kSmemFloats<E>];
  const int b = 1 << log_b;
  const int tpb = b / E;
  const int t = static_cast<int>(threadIdx.x) % tpb;  // thread within its Hadamard block
  const int64_t g = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpb) + threadIdx.x / tpb;
  const bool valid = g < total;  // only CTAs shared by several small blocks can have idle groups
  const int64_t row = valid ? g / nblocks : 0, blk = valid ? g % nblocks : 0;
  hadamard_quantize_group<T, E, false>(x + row * row_stride + blk * b, valid, t, tpb, rsqrt_b, inv, qmin, qmax, vec,
                                       smem, out + g * b);
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out, int64_t n, int64_t b, int qmin,
            int qmax) {
  const int64_t rows = x.size(0);
  const int64_t nblocks = n / b;
  const int64_t total = rows * nblocks;
  const int E = elems_per_thread(b);
  const int64_t tpb = b / E;
  const int64_t per_cta = tpb < 32 ? 32 / tpb : 1;
  const int64_t threads = tpb * per_cta;
  const int64_t grid = (total + per_cta - 1) / per_cta;
  QMAMBA_CHECK(grid < (int64_t(1) << 31), "hadamard_quantize: ", total, " Hadamard blocks exceed the grid limit");
  const int log_b = block_log2(b);
  const float rsqrt_b = block_rsqrt(b);  // as torch multiplies the fp32 tensor
  const int64_t row_stride = x.stride(0);
  const bool vec = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                   (row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                   (b * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto go = [&](auto e_tag) {
    constexpr int kE = decltype(e_tag)::value;
    launch_overlapped(hadamard_quantize_kernel<T, kE>, dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(threads)), 0, stream,
        x.data_ptr<T>(), row_stride, static_cast<int>(nblocks), log_b, total, rsqrt_b, scale.data_ptr<float>(), qmin,
        qmax, vec, out.data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (E) {
    case 1: go(std::integral_constant<int, 1>{}); break;
    case 2: go(std::integral_constant<int, 2>{}); break;
    case 4: go(std::integral_constant<int, 4>{}); break;
    case 8: go(std::integral_constant<int, 8>{}); break;
    default: go(std::integral_constant<int, 16>{}); break;
  }
}

at::Tensor hadamard_quantize(const at::Tensor& x, const at::Tensor& scale, int64_t bits) {
  QMAMBA_CHECK_CUDA(x);
  QMAMBA_CHECK(x.dim() == 2 && x.size(1) >= 1 && (x.size(1) == 1 || x.stride(1) == 1),
               "hadamard_quantize: x must be (M, n) with a contiguous last dim, got sizes ", x.sizes(), " strides ",
               x.strides());
  QMAMBA_CHECK_SCALAR_SCALE(scale);
  QMAMBA_CHECK(scale.device() == x.device(), "hadamard_quantize: scale is on ", scale.device(), " but x is on ",
               x.device());
  QMAMBA_CHECK(bits >= 2 && bits <= 8, "hadamard_quantize: bits must be in 2..8, got ", bits);
  const int64_t n = x.size(1);
  const int64_t b = n & -n;
  QMAMBA_CHECK(b <= kMaxBlock, "hadamard_quantize: Hadamard blocks of up to ", kMaxBlock, " elements, got ", b,
               " (n = ", n, "); use backend='torch'");
  const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(at::kChar));
  if (x.size(0) == 0) return out;
  switch (x.scalar_type()) {
    case at::kFloat: launch<float>(x, scale, out, n, b, qmin, qmax); break;
    case at::kHalf: launch<at::Half>(x, scale, out, n, b, qmin, qmax); break;
    case at::kBFloat16: launch<at::BFloat16>(x, scale, out, n, b, qmin, qmax); break;
    default: QMAMBA_CHECK(false, "hadamard_quantize: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace qmamba

TORCH_LIBRARY_FRAGMENT(qmamba, m) { m.def("hadamard_quantize(Tensor x, Tensor scale, int bits) -> Tensor"); }

TORCH_LIBRARY_IMPL(qmamba, CUDA, m) { m.impl("hadamard_quantize", &qmamba::hadamard_quantize); }
