// Hadamard rotation + int8 quantize of one Hadamard block by a group of threads, as device functions: the one copy of
// the math (see hadamard_quantize.cu for the formula and its order), used by hadamard_quantize_kernel and by the
// Mamba1 scan update that rotates and quantizes out_proj's input itself (selective_scan/selective_scan_int8.cu).
#pragma once

#include "common/qmamba_common.cuh"

#include <cmath>

namespace qmamba {
namespace {

constexpr int kMaxBlock = 8192;  // b <= 32 * E * E with E = 16: the cross-warp stages fit one thread's registers

// Elements per thread for a Hadamard block of b elements (b a power of two <= kMaxBlock).
inline int elems_per_thread(int64_t b) { return b <= 2048 ? static_cast<int>(b < 8 ? b : 8) : 16; }

// log2 of a Hadamard block of b elements (b a power of two).
inline int block_log2(int64_t b) {
  int lg = 0;
  while ((int64_t(1) << lg) < b) ++lg;
  return lg;
}

// The rotation's scale 1 / sqrt(b) as torch applies it: the Python double 1/sqrt(b) converted to fp32 (IEEE sqrt and
// division are correctly rounded in both languages, so the double is the same).
inline float block_rsqrt(int64_t b) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(b)));
}

// Load E consecutive elements upcast to fp32: 16-byte vector loads where the caller checked alignment. COHERENT:
// through L2 only (ld.global.cg), for data other blocks of the same kernel wrote (the scan update's fused rotation).
template <typename T, int E, bool COHERENT>
__device__ __forceinline__ void load_elems(const T* __restrict__ p, float (&v)[E], bool vec) {
  constexpr int kBytes = E * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    if (vec) {
      alignas(16) T tmp[E];
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c) {
        const uint4* src = reinterpret_cast<const uint4*>(p) + c;
        reinterpret_cast<uint4*>(tmp)[c] = COHERENT ? __ldcg(src) : *src;
      }
#pragma unroll
      for (int j = 0; j < E; ++j) v[j] = static_cast<float>(tmp[j]);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < E; ++j) {
    if constexpr (COHERENT && sizeof(T) == 4) {
      v[j] = __ldcg(reinterpret_cast<const float*>(p) + j);
    } else if constexpr (COHERENT) {  // 2-byte elements: read through L2 as unsigned short bit patterns
      const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p) + j);
      v[j] = static_cast<float>(*reinterpret_cast<const T*>(&bits));
    } else {
      v[j] = static_cast<float>(p[j]);
    }
  }
}

// The butterfly stages h = 1 .. E/2 on one thread's E elements (their block offset is a multiple of E, so the pair
// rule (i & h) == 0 is the same on local indices).
template <int E>
__device__ __forceinline__ void butterflies_in_thread(float (&v)[E], int count) {
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
    if (h < count) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if ((i & h) == 0 && i < count) {
          const float a = v[i], c = v[i + h];
          v[i] = __fadd_rn(a, c);
          v[i + h] = __fsub_rn(a, c);
        }
      }
    }
  }
}

__device__ __forceinline__ int padded(int e) { return e + (e >> 5); }

// One Hadamard block of tpb * E elements rotated and quantized by threads t = 0 .. tpb - 1 of the CTA (valid: t holds
// elements; the others take part in the shuffles and barriers only): src its first element, dst its first code.
// Every thread of the CTA calls it (it has barriers when tpb > 32), with the same tpb; `smem` holds kSmemFloats<E>.
template <int E>
constexpr int kSmemFloats = E >= 8 ? 32 * E * E + E * E : 1;  // one float of padding per 32: both the per-thread
                                                               // runs (stride E) and the group reads (stride 1) hit
                                                               // 32 banks

template <typename T, int E, bool COHERENT>
__device__ __forceinline__ void hadamard_quantize_group(const T* __restrict__ src, bool valid, int t, int tpb,
                                                        float rsqrt_b, float inv, int qmin, int qmax, bool vec,
                                                        float* smem, int8_t* __restrict__ dst) {
  float v[E];
  if (valid) {
    load_elems<T, E, COHERENT>(src + static_cast<int64_t>(t) * E, v, vec);
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = 0.0f;  // idle lanes still take part in the shuffles
  }

  // stages h < E: inside the thread
  butterflies_in_thread<E>(v, E);

  // stages h = m E for lane bits m < min(tpb, 32): the partner holds y[i ^ h]. blockDim.x is a multiple of 32 and
  // a group of tpb < 32 threads is tpb-aligned inside its warp, so lane ^ m stays in the group and the mask is full.
  const int lane_span = tpb < 32 ? tpb : 32;
  for (int m = 1; m < lane_span; m <<= 1) {
    const bool upper = (t & m) != 0;  // holds y[i + h]: its result is y[i] - y[i + h] = partner - own
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const float p = __shfl_xor_sync(0xffffffffu, v[j], m);
      v[j] = upper ? __fsub_rn(p, v[j]) : __fadd_rn(v[j], p);
    }
  }

  // stages h >= 32 E: the warp-index bits (one Hadamard block per CTA here, W = tpb / 32 warps, W <= E)
  if (tpb > 32) {
    const int W = tpb / 32;
    const int span = 32 * E;  // distance between the W elements of one group
    if (valid) {
#pragma unroll
      for (int j = 0; j < E; ++j) smem[padded(t * E + j)] = v[j];
    }
    __syncthreads();
    for (int q = 0; valid && q < E / W; ++q) {
      const int r = t + q * tpb;  // groups r = 0 .. span - 1, consecutive across lanes (no bank conflicts)
      float z[E];
#pragma unroll
      for (int k = 0; k < E; ++k) z[k] = k < W ? smem[padded(r + k * span)] : 0.0f;
      butterflies_in_thread<E>(z, W);  // stage h = k_h * span pairs group members k, k + k_h, in torch's order
#pragma unroll
      for (int k = 0; k < E; ++k) {
        if (k < W) smem[padded(r + k * span)] = z[k];
      }
    }
    __syncthreads();
    if (valid) {
#pragma unroll
      for (int j = 0; j < E; ++j) v[j] = smem[padded(t * E + j)];
    }
  }

  if (!valid) return;
  alignas(16) int8_t q[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    int c = __float2int_rn(__fmul_rn(__fmul_rn(v[j], rsqrt_b), inv));
    c = c < qmin ? qmin : (c > qmax ? qmax : c);
    q[j] = static_cast<int8_t>(c);
  }
  dst += static_cast<int64_t>(t) * E;  // E-byte aligned: out is fresh, b and t * E multiples
  if constexpr (E == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(q);
  } else if constexpr (E == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(q);
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) dst[j] = q[j];
  }
}

}  // namespace
}  // namespace qmamba
