// Mamba1 selective scan on int8 inputs: prefill (a whole sequence) and the one-token state update (decode).
//
// Math (fp32 throughout; the torch twin is qmamba.ops.int8_selective_scan.selective_scan_int8_ref):
//   u = rt(qu * su)   delta = softplus(rt(qdelta * sdelta) + delta_bias)   B = rt(qB * sB)   C = rt(qC * sC)
//   h[t] = exp(delta[t] * A) * h[t-1] + (delta[t] * u[t]) * B[t]       y[t] = sum_n C[t, n] h[t, n] + u[t] * D
//   y[t] *= silu(rt(qz * sz))                                            out = T(y)
// where rt(v) rounds through the activation dtype T (the torch int8 backend's QuantPoint.roundtrip ends with
// `.to(x.dtype)`), so an fp16 / bf16 model sees the same dequantized inputs here and there.
// The update may compute delta's codes itself (dt_proj fused, one kernel fewer per layer and decode step): given dt,
// Mamba1's x_proj output columns for dt_proj (int8, per-tensor scale), and dt_proj's int8 weight (D, R), channel d's
// code is the W8A8 GEMV's REQUANT epilogue (csrc/linear/gemv_int8.cu) op for op, so it is bit-identical to the code
// the GEMV would have handed over:
//   acc = sum_k dt[k] W[d, k] (int32)   v = float(acc) * (s_dt * s_w[d]) (+ bias[d])   qdelta = q(rt(v), sdelta)
// A dual-scale u (issue 5) decodes with dual_decode (common/qmamba_common.cuh) instead of qu * su: the mask encoding
// reads its flags from u_mask (packed 8 steps a byte along L: byte l / 8, bit l % 8; the update reads bit 0 of one byte
// per (batch, channel)), the piecewise encoding needs none. Everything after u's dequantization is unchanged.
//
// Prefill layout: one block = CH channels of one batch element; each channel's N states are split over KP lanes
// (consecutive lanes of one warp), NPL states per lane held in registers, walked sequentially over time with
// exp(delta A) = exp2(delta A log2 e) on the SFU. Time goes in tiles of TT steps. A tile's codes are fetched into
// registers while the recurrence runs on the tile before (one 32-bit load per 4 channels of u / delta / z or 4
// states of B / C where the layout allows: the mixer's channel-last views do), then staged into shared memory,
// dequantized, with the per-(channel, step) work (delta's bias and softplus, delta * u, u * D, the gate) done once,
// not once per lane. Every lane runs its NPL recurrences over the tile, the KP partial sums of C h are reduced with
// warp shuffles, and an epilogue writes y, 4 channels a vector store (y is allocated channel-last). NPL is picked
// per launch (4 unless (batch x channels) is too small to fill the GPU), or given (states_per_lane).
#include "common/qmamba_common.cuh"
#include "hadamard/hadamard_block.cuh"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace qmamba {
namespace {

constexpr int kScanThreads = 128;    // prefill block size (a multiple of 32: every warp is full for the shuffles)
constexpr int kUpdateThreads = 128;  // update block size
constexpr int kMaxState = 256;       // N <= 32 lanes x 8 states per lane

struct ScanParams {
  const int8_t *u, *delta, *z, *B, *C;
  const float *u_scale, *delta_scale, *z_scale, *B_scale, *C_scale;
  const float *A, *D, *delta_bias, *h0;
  const uint8_t* u_mask;  // dual-scale mask encoding: (batch, dim, ceil(len / 8)) with strides um_s*
  DualScaleArgs u_dual;
  void* y;
  float* last;
  int batch, dim, len, nstate;
  int64_t um_sb, um_sd, um_sl;
  int64_t u_sb, u_sd, u_sl, dl_sb, dl_sd, dl_sl, z_sb, z_sd, z_sl;
  int64_t B_sb, B_sn, B_sl, C_sb, C_sn, C_sl;
  int64_t A_sd, A_sn, D_s, bias_s, h0_sb, h0_sd, h0_sn;
  int64_t y_sb, y_sd, y_sl;  // last is contiguous (batch, dim, nstate)
  bool softplus;
  int lanes;  // KP: lanes per channel, a power of two <= 32
  int chans;  // CH: channels per block = kScanThreads / KP
  int tile;   // TT: time steps per shared-memory tile
  // 4 consecutive codes along the channel (u, delta, z) / state (B, C) axis are one aligned 32-bit word, and 4
  // consecutive outputs along the channel one aligned vector (stride 1, 4-aligned addresses): one load / store each
  bool vec_u, vec_delta, vec_z, vec_bc, vec_y;
};

constexpr int kScanItems = 4;    // prefill: (4 channels, 1 step) words of u / delta / z a thread fetches a tile, at most
constexpr int kScanBCWords = 2;  // prefill: (4 states, 1 step) words of B and of C a thread fetches a tile, at most
constexpr float kLog2e = 1.4426950408889634f;

// exp2 by the SFU (ex2.approx.ftz: relative error ~2^-22; arguments here are <= 0, results in [0, 1])
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Codes p[0], p[stride], p[2 stride], p[3 stride] packed little-endian in a word (count < 4: the rest 0): one 32-bit
// load when vec (stride 1 and p 4-byte aligned, decided on the host for the whole launch), else byte loads.
__device__ __forceinline__ uint32_t load_codes4(const int8_t* p, int64_t stride, int count, bool vec) {
  if (vec) return __ldg(reinterpret_cast<const unsigned int*>(p));
  uint32_t w = 0u;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (e < count) w |= static_cast<uint32_t>(static_cast<uint8_t>(__ldg(p + e * stride))) << (8 * e);
  }
  return w;
}

__device__ __forceinline__ int8_t code_at(uint32_t w, int e) { return static_cast<int8_t>((w >> (8 * e)) & 0xffu); }

// NPL consecutive floats of shared memory (16-byte aligned for NPL >= 4, 8-byte for 2) in vector loads
template <int NPL>
__device__ __forceinline__ void load_smem(const float* p, float (&v)[NPL]) {
  if constexpr (NPL % 4 == 0) {
#pragma unroll
    for (int i = 0; i < NPL / 4; ++i) {
      const float4 q = reinterpret_cast<const float4*>(p)[i];
      v[4 * i] = q.x, v[4 * i + 1] = q.y, v[4 * i + 2] = q.z, v[4 * i + 3] = q.w;
    }
  } else if constexpr (NPL == 2) {
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x, v[1] = q.y;
  } else {
#pragma unroll
    for (int i = 0; i < NPL; ++i) v[i] = p[i];
  }
}

// y[0..count) to p[e * stride] in T (round to nearest); one vector store when vec (stride 1, p aligned to 4 T's)
template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t stride, const float (&y)[4], int count, bool vec) {
  if (vec) {
    if constexpr (std::is_same_v<T, float>) {
      *reinterpret_cast<float4*>(p) = make_float4(y[0], y[1], y[2], y[3]);
    } else if constexpr (std::is_same_v<T, at::Half>) {
      const __half2 lo = __floats2half2_rn(y[0], y[1]), hi = __floats2half2_rn(y[2], y[3]);
      *reinterpret_cast<uint2*>(p) = make_uint2(*reinterpret_cast<const unsigned int*>(&lo),
                                                *reinterpret_cast<const unsigned int*>(&hi));
    } else {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(y[0], y[1]), hi = __floats2bfloat162_rn(y[2], y[3]);
      *reinterpret_cast<uint2*>(p) = make_uint2(*reinterpret_cast<const unsigned int*>(&lo),
                                                *reinterpret_cast<const unsigned int*>(&hi));
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (e < count) p[e * stride] = static_cast<T>(y[e]);
  }
}

template <typename T>
__device__ __forceinline__ float deq(int8_t q, float scale) {
  return round_through<T>(static_cast<float>(q) * scale);
}

// u's value in a dual-scale encoding enc (flag: the element's mask bit; ignored unless the mask encoding).
template <typename T>
__device__ __forceinline__ float deq_u(int8_t q, bool flag, float su, float su_out, int enc, int knee) {
  return round_through<T>(dual_decode(q, flag, enc, knee, su, su_out));
}

// ENC: u's encoding, a compile-time constant (kEncSingle: the single-scale code, as it always ran).
// The sum of v over each group of `lanes` consecutive lanes (a power of two <= 32; groups aligned within the warp),
// in every lane of its group; every lane of the warp must take part. The same xor tree wherever it is called, so a
// sum is the same whatever kernel makes it.
template <typename V>
__device__ __forceinline__ V group_sum(V v, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, int NPL, int ENC>
__global__ void __launch_bounds__(kScanThreads) selective_scan_int8_kernel(const ScanParams p) {
  kernel_prologue();  // first: see launch_overlapped (common/qmamba_common.cuh)
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int KP = p.lanes, CH = p.chans, TT = p.tile, N = p.nstate, L = p.len;
  const int NP = KP * NPL;  // padded state count: states >= N have A = B = C = 0 and stay 0
  const int G = CH / 4;     // 4-channel groups of the block
  const int NW = (N + 3) / 4;  // 4-state words of B / C a step
  float* sB = smem;                                          // [TT][NP]
  float* sC = sB + TT * NP;                                  // [TT][NP]
  float2* sDD = reinterpret_cast<float2*>(sC + TT * NP);     // [TT][CH]  (delta, delta * u)
  float* sUD = reinterpret_cast<float*>(sDD + TT * CH);      // [TT][CH]  u * D
  float* sG = sUD + TT * CH;                                 // [TT][CH]  silu(z), or 1 without a gate
  float* sY = sG + TT * CH;                                  // [TT][CH]  sum_n C h

  const int b = blockIdx.y;
  const int d0 = blockIdx.x * CH;
  const int tid = threadIdx.x;
  // the recurrence: lane k of channel c holds states k * NPL .. k * NPL + NPL - 1
  const int c = tid / KP, k = tid % KP;
  const int d = d0 + c;
  const bool d_ok = d < p.dim;
  // the loads / epilogue: 4 channels (group gq) at steps trow, trow + RP, ...: the same channels every tile
  const int gq = tid % G, trow = tid / G, RP = kScanThreads / G;
  const int dq = d0 + 4 * gq;
  const int cnt = min(4, p.dim - dq);  // channels of the group that exist (<= 0: none)

  const float su = *p.u_scale, sd = *p.delta_scale, sBs = *p.B_scale, sCs = *p.C_scale;
  const float sz = p.z != nullptr ? *p.z_scale : 0.0f;
  const float s_out = ENC != kEncSingle ? *p.u_dual.s_out : 0.0f;

  float A2[NPL], h[NPL];  // A2 = A log2(e): exp(delta A) = exp2(delta A2)
#pragma unroll
  for (int j = 0; j < NPL; ++j) {
    const int s = k * NPL + j;
    const bool ok = d_ok && s < N;
    A2[j] = ok ? p.A[d * p.A_sd + s * p.A_sn] * kLog2e : 0.0f;
    h[j] = (ok && p.h0 != nullptr) ? p.h0[b * p.h0_sb + d * p.h0_sd + s * p.h0_sn] : 0.0f;
  }
  float Dv[4], bias[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    Dv[e] = e < cnt ? p.D[(dq + e) * p.D_s] : 0.0f;
    bias[e] = (e < cnt && p.delta_bias != nullptr) ? p.delta_bias[(dq + e) * p.bias_s] : 0.0f;
  }
  // this thread's B / C words: step bt[j], states 4 * bs[j] .. + 3 (bt[j] >= TT: none)
  int bt[kScanBCWords], bs[kScanBCWords];
#pragma unroll
  for (int j = 0; j < kScanBCWords; ++j) {
    const int v = tid + j * kScanThreads;
    bt[j] = v / NW;
    bs[j] = v % NW;
  }

  const int8_t* Bb = p.B + b * p.B_sb;
  const int8_t* Cb = p.C + b * p.C_sb;
  const int8_t* ub = p.u + b * p.u_sb;
  const int8_t* dlb = p.delta + b * p.dl_sb;
  const int8_t* zb = p.z != nullptr ? p.z + b * p.z_sb : nullptr;
  const uint8_t* mb = ENC == kEncMask ? p.u_mask + b * p.um_sb : nullptr;
  T* yb = static_cast<T*>(p.y) + b * p.y_sb;

  // A tile's codes, fetched into registers one tile ahead (in flight while the recurrence runs on the tile before)
  uint32_t ru[kScanItems], rd[kScanItems], rz[kScanItems], rm[kScanItems], rb[kScanBCWords], rc[kScanBCWords];
  auto fetch = [&](int t0) {
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      const int tg = t0 + trow + j * RP;
      ru[j] = rd[j] = rz[j] = rm[j] = 0u;
      if (trow + j * RP < TT && tg < L && cnt > 0) {
        ru[j] = load_codes4(ub + dq * p.u_sd + tg * p.u_sl, p.u_sd, cnt, p.vec_u);
        rd[j] = load_codes4(dlb + dq * p.dl_sd + tg * p.dl_sl, p.dl_sd, cnt, p.vec_delta);
        if (zb != nullptr) rz[j] = load_codes4(zb + dq * p.z_sd + tg * p.z_sl, p.z_sd, cnt, p.vec_z);
        if constexpr (ENC == kEncMask) {  // bit e: channel dq + e's outlier flag at step tg
          for (int e = 0; e < cnt; ++e) {
            rm[j] |= ((mb[(dq + e) * p.um_sd + (tg >> 3) * p.um_sl] >> (tg & 7)) & 1u) << e;
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kScanBCWords; ++j) {
      const int tg = t0 + bt[j];
      rb[j] = rc[j] = 0u;
      if (bt[j] < TT && tg < L) {
        const int s = 4 * bs[j], n = min(4, N - s);
        rb[j] = load_codes4(Bb + s * p.B_sn + tg * p.B_sl, p.B_sn, n, p.vec_bc);
        rc[j] = load_codes4(Cb + s * p.C_sn + tg * p.C_sl, p.C_sn, n, p.vec_bc);
      }
    }
  };
  // The fetched codes dequantized into shared memory, with the per-(channel, step) work done once, not once per
  // lane. Steps past L get delta = 0: exp(0) = 1 and no input, so the state carries through unchanged.
  auto stage = [&](int t0) {
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      const int t = trow + j * RP, tg = t0 + t;
      if (t < TT) {  // channels past dim get zeros too (their lanes run on them; nothing of theirs is written)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dl = 0.0f, du = 0.0f, ud = 0.0f, g = 1.0f;
          if (e < cnt && tg < L) {
            const int8_t qu = code_at(ru[j], e);
            float uu;
            if constexpr (ENC != kEncSingle) {
              uu = deq_u<T>(qu, (rm[j] >> e) & 1u, su, s_out, ENC, p.u_dual.knee);
            } else {
              uu = deq<T>(qu, su);
            }
            dl = deq<T>(code_at(rd[j], e), sd);
            if (p.delta_bias != nullptr) dl = dl + bias[e];
            if (p.softplus) dl = softplus(dl);
            du = dl * uu;
            ud = uu * Dv[e];
            if (zb != nullptr) g = silu(deq<T>(code_at(rz[j], e), sz));
          }
          const int i = t * CH + 4 * gq + e;
          sDD[i] = make_float2(dl, du);
          sUD[i] = ud;
          sG[i] = g;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kScanBCWords; ++j) {
      if (bt[j] < TT) {
        const int tg = t0 + bt[j];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int s = 4 * bs[j] + e;
          if (s < NP) {
            const bool ok = s < N && tg < L;
            sB[bt[j] * NP + s] = ok ? deq<T>(code_at(rb[j], e), sBs) : 0.0f;
            sC[bt[j] * NP + s] = ok ? deq<T>(code_at(rc[j], e), sCs) : 0.0f;
          }
        }
      }
    }
  };

  // padded states (s >= 4 NW) are never staged: zero once
  for (int i = tid; i < 2 * TT * NP; i += kScanThreads) smem[i] = 0.0f;
  fetch(0);
  __syncthreads();
  stage(0);
  for (int t0 = 0; t0 < L; t0 += TT) {
    const bool more = t0 + TT < L;
    if (more) fetch(t0 + TT);
    __syncthreads();  // the tile is staged

    // The recurrence. `steps` is the same for every thread, so all lanes reach every shuffle.
    const int steps = min(TT, L - t0);
#pragma unroll 4
    for (int t = 0; t < steps; ++t) {
      const float2 dd = sDD[t * CH + c];
      float Bt[NPL], Ct[NPL];
      load_smem<NPL>(sB + t * NP + k * NPL, Bt);
      load_smem<NPL>(sC + t * NP + k * NPL, Ct);
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < NPL; ++j) {
        const float dA = exp2_approx(dd.x * A2[j]);
        h[j] = dA * h[j] + dd.y * Bt[j];
        part += Ct[j] * h[j];
      }
      part = group_sum(part, KP);
      if (k == 0) sY[t * CH + c] = part;
    }
    __syncthreads();  // sY is complete; every lane is done with the tile's sB / sC / sDD

    // Epilogue: y = (sum_n C h + u * D) * gate for this thread's 4 channels, then the next tile staged in their place
    // (the same thread reads sUD / sG here and writes them in stage: no barrier between).
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      const int t = trow + j * RP;
      if (t < steps && cnt > 0) {
        float y[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = t * CH + 4 * gq + e;
          y[e] = (sY[i] + sUD[i]) * sG[i];
        }
        store4<T>(yb + (t0 + t) * p.y_sl + dq * p.y_sd, p.y_sd, y, cnt, p.vec_y);
      }
    }
    if (more) stage(t0 + TT);
  }

#pragma unroll
  for (int j = 0; j < NPL; ++j) {
    const int s = k * NPL + j;
    if (d_ok && s < N) p.last[(static_cast<int64_t>(b) * p.dim + d) * N + s] = h[j];
  }
}

struct UpdateParams {
  float* state;
  const int8_t *u, *delta, *z, *B, *C;  // delta: nullptr when dt_proj is fused (dt below)
  const float *u_scale, *delta_scale, *z_scale, *B_scale, *C_scale;
  const float *A, *D, *delta_bias;
  const uint8_t* u_mask;  // dual-scale mask encoding: one byte per (batch, channel), the flag in bit 0
  DualScaleArgs u_dual;
  int64_t um_sb, um_sd;
  void* y;  // contiguous (batch, dim)
  int batch, dim, nstate;
  int64_t st_sb, st_sd, st_sn, u_sb, u_sd, dl_sb, dl_sd, z_sb, z_sd, B_sb, B_sn, C_sb, C_sn;
  int64_t A_sd, A_sn, D_s, bias_s;
  bool softplus;
  // dt_proj fused (dt != nullptr): dt (batch, R) int8 rows at stride dt_sb, dt_w (D, R) int8 contiguous, dt_scale one
  // element, dt_w_scale 1 or D elements, dt_bias (D,) at stride dt_bias_s or nullptr
  const int8_t *dt, *dt_w;
  const float *dt_scale, *dt_w_scale, *dt_bias;
  int64_t dt_sb, dt_bias_s;
  int dt_rank;
  bool dt_w_per_channel;
  bool dt_vec;  // R % 16 == 0 and every dt / weight row 16-byte aligned: 16-byte loads and __dp4a (one flag for all)
  // out_proj's rotated input made here (hq_out != nullptr; the ROTATE kernel): hq_out (batch, dim) int8 =
  // hadamard_quantize(y, hq_scale, bits), Hadamard blocks of 2^hq_log_b channels, hq_counters (batch, dim / block)
  // int32 zeros between calls (the kernel leaves them so)
  int8_t* hq_out;
  const float* hq_scale;
  int* hq_counters;
  int hq_log_b, hq_qmin, hq_qmax;
  float hq_rsqrt_b;
  bool hq_vec;
};

// dt_proj's requant epilogue operands for channel d, loaded before its dot (they do not depend on it):
// s = dt_scale * w_scale[d], its bias, and 1 / delta_scale, as the GEMV computes them.
struct DtEpilogue {
  float scale, bias, inv;
};

__device__ __forceinline__ DtEpilogue dt_epilogue_load(const UpdateParams& p, int d) {
  DtEpilogue ep;
  ep.scale = __fmul_rn(*p.dt_scale, p.dt_w_scale[p.dt_w_per_channel ? d : 0]);
  ep.bias = p.dt_bias != nullptr ? p.dt_bias[d * p.dt_bias_s] : 0.0f;
  ep.inv = __fdiv_rn(1.0f, *p.delta_scale);
  return ep;
}

// Channel d's delta code from batch element b's dt codes: dt_proj's W8A8 GEMV with its REQUANT epilogue, copied from
// gemv_int8.cu op for op (integer sums: any order; then the same fp32 roundings, never contracted into an FMA), so the
// code is bit-identical to the GEMV's. The channel's KP lanes (lane = its index in the group) split the row: lane l
// sums 16-byte chunks l, l + KP, ... (bytes l, l + KP, ... without dt_vec), and a shuffle reduction over the group
// gives every lane the whole sum. The dt row is the same for every channel of the block (one batch element per
// block): its loads are broadcasts from L1.
template <typename T, int KP>
__device__ __forceinline__ int8_t dt_proj_code(const UpdateParams& p, int b, int d, int lane, const DtEpilogue& ep) {
  const int8_t* x = p.dt + b * p.dt_sb;
  const int8_t* w = p.dt_w + static_cast<int64_t>(d) * p.dt_rank;
  int acc = 0;
  if (p.dt_vec) {
    const int4* x4 = reinterpret_cast<const int4*>(x);
    const int4* w4 = reinterpret_cast<const int4*>(w);
    const int chunks = p.dt_rank >> 4;
    for (int c = lane; c < chunks; c += KP) acc = dot16(__ldg(w4 + c), __ldg(x4 + c), acc);
  } else {
    for (int k = lane; k < p.dt_rank; k += KP) acc += static_cast<int>(x[k]) * static_cast<int>(__ldg(w + k));
  }
  acc = group_sum(acc, KP);
  float v = __fmul_rn(__int2float_rn(acc), ep.scale);
  if (p.dt_bias != nullptr) v = __fadd_rn(v, ep.bias);
  return quantize_rn(round_through<T>(v), ep.inv);
}

// KP lanes (consecutive, one warp) per (batch, channel), kUpdateThreads / KP channels per block: lane l holds states
// l, l + KP, ... (so a warp's state and A loads are contiguous runs for a (batch, D, N) contiguous state), and the
// partial sums of C h are reduced with shuffles; every load of a step is one round trip, which is what the update
// waits on (a few MB of state at most: latency, not bandwidth, is its cost). Every lane of a group computes the
// channel's scalars (u, delta, gate: same addresses, one transaction); lane 0 writes y. Channels past dim run
// clamped to the last one and write nothing, so every lane of the warp takes part in the shuffles.
// The rotation of out_proj's input fused into the update (ROTATE): the CTAs of a Hadamard block of channels count
// themselves in when their y are stored; the last one (its y and everyone else's visible: fences on both sides of the
// count) rotates and quantizes the block with hadamard_quantize_group, the Hadamard kernel's own math, reading y
// through L2. It resets the count, so the counters are zeros again for the next call (and graph replay).
template <typename T, int KP>
__device__ __forceinline__ void rotate_quantize_block(const UpdateParams& p, int b, float inv) {
  constexpr int kChans = kUpdateThreads / KP;
  constexpr int E = 8;  // elems_per_thread of every block the host allows (8 <= 2^hq_log_b <= 8 * kUpdateThreads)
  __shared__ float smem[kSmemFloats<E>];
  __shared__ int last;
  const int hb = 1 << p.hq_log_b;
  const int g = (blockIdx.x * kChans) >> p.hq_log_b;  // one Hadamard block per CTA: hb >= kChans (host-checked)
  __syncthreads();  // this CTA's y are stored
  if (threadIdx.x == 0) {
    __threadfence();
    int* count = p.hq_counters + b * (p.dim >> p.hq_log_b) + g;
    last = atomicAdd(count, 1) == hb / kChans - 1;
    if (last) *count = 0;  // every CTA of the block has counted
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int64_t off = static_cast<int64_t>(b) * p.dim + static_cast<int64_t>(g) * hb;
  const int tpb = hb / E;
  hadamard_quantize_group<T, E, true>(static_cast<const T*>(p.y) + off, static_cast<int>(threadIdx.x) < tpb,
                                      threadIdx.x, tpb, p.hq_rsqrt_b, inv, p.hq_qmin, p.hq_qmax, p.hq_vec, smem,
                                      p.hq_out + off);
}

template <typename T, int KP, bool ROTATE>
__global__ void __launch_bounds__(kUpdateThreads) selective_scan_int8_update_kernel(const UpdateParams p) {
  constexpr int kChans = kUpdateThreads / KP;
  constexpr int kMaxNpl = KP < 32 ? 1 : kMaxState / 32;  // KP < 32 only when N <= KP
  const int b = blockIdx.y;
  const int lane = threadIdx.x % KP;
  const int d_raw = blockIdx.x * kChans + threadIdx.x / KP;
  const bool d_ok = d_raw < p.dim;
  const int d = d_ok ? d_raw : p.dim - 1;
  // dt_proj's weight is read-only: the first batch element's blocks send its rows to L2 before the prologue, while
  // the kernel before this one (x_proj's GEMV, whose output is dt) may still be running (launch_overlapped)
  if (p.dt != nullptr && b == 0 && d_ok) {
    const int8_t* w = p.dt_w + static_cast<int64_t>(d) * p.dt_rank;
    for (int off = lane * 128; off < p.dt_rank; off += KP * 128)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(w + off));
    if (lane == 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(w + p.dt_rank - 1));  // the row's last line
  }
  kernel_prologue();  // see launch_overlapped (common/qmamba_common.cuh)
  // every load of the step is issued first, before the work that waits on one (dt_proj's dot, the dequantizes): the
  // step then waits on one round trip of memory, not on a chain of them
  const int N = p.nstate;
  const int8_t qu = p.u[b * p.u_sb + d * p.u_sd];
  const bool dual = p.u_dual.enc != kEncSingle;
  const bool flag = dual && p.u_mask != nullptr && (p.u_mask[b * p.um_sb + d * p.um_sd] & 1);
  const float su = *p.u_scale, su_out = dual ? *p.u_dual.s_out : 0.0f;
  const float sdl = *p.delta_scale, sBs = *p.B_scale, sCs = *p.C_scale;
  const float dbias = p.delta_bias != nullptr ? p.delta_bias[d * p.bias_s] : 0.0f;
  const float Dd = p.D[d * p.D_s];
  const int8_t qz = p.z != nullptr ? p.z[b * p.z_sb + d * p.z_sd] : int8_t(0);
  const float sz = p.z != nullptr ? *p.z_scale : 0.0f;
  const float hq_inv = ROTATE ? __fdiv_rn(1.0f, *p.hq_scale) : 0.0f;
  float* st = p.state + b * p.st_sb + d * p.st_sd;
  const float* Ad = p.A + d * p.A_sd;
  float h[kMaxNpl], a[kMaxNpl];
  int8_t qB[kMaxNpl], qC[kMaxNpl];
#pragma unroll
  for (int j = 0; j < kMaxNpl; ++j) {
    const int s = lane + j * KP;
    if (s < N) {
      h[j] = st[s * p.st_sn];
      a[j] = Ad[s * p.A_sn];
      qB[j] = p.B[b * p.B_sb + s * p.B_sn];
      qC[j] = p.C[b * p.C_sb + s * p.C_sn];
    }
  }
  int8_t qdelta;
  if (p.dt != nullptr) {
    const DtEpilogue ep = dt_epilogue_load(p, d);
    qdelta = dt_proj_code<T, KP>(p, b, d, lane, ep);
  } else {
    qdelta = p.delta[b * p.dl_sb + d * p.dl_sd];
  }

  const float uu = dual ? deq_u<T>(qu, flag, su, su_out, p.u_dual.enc, p.u_dual.knee) : deq<T>(qu, su);
  float dl = deq<T>(qdelta, sdl);
  if (p.delta_bias != nullptr) dl = dl + dbias;
  if (p.softplus) dl = softplus(dl);
  const float du = dl * uu;
  float y = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxNpl; ++j) {
    const int s = lane + j * KP;
    if (s < N) {
      const float hs = expf(dl * a[j]) * h[j] + du * deq<T>(qB[j], sBs);
      if (d_ok) st[s * p.st_sn] = hs;
      y += deq<T>(qC[j], sCs) * hs;
    }
  }
  y = group_sum(y, KP);
  if (d_ok && lane == 0) {
    y = y + uu * Dd;
    if (p.z != nullptr) y = y * silu(deq<T>(qz, sz));
    static_cast<T*>(p.y)[static_cast<int64_t>(b) * p.dim + d] = static_cast<T>(y);
  }
  if constexpr (ROTATE) rotate_quantize_block<T, KP>(p, b, hq_inv);
}

// ---- host side -----------------------------------------------------------------------------------------------------

int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

int lanes_for(int nstate, int npl) { return next_pow2((nstate + npl - 1) / npl); }

int sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device] = sms;
  return sms;
}

// States per lane: 4 (8 when N > 128, so a channel fits in one warp) unless that leaves the GPU short of threads
// (fewer than ~256 per SM: each lane's NPL recurrences are independent chains, so fewer, fuller lanes hide the
// SFU's latency as well as more lanes would), then halve down to 1. `wanted` (1, 2, 4 or 8) overrides the choice
// where it fits (states_per_lane of the op: benchmarks and tests of every variant at any shape).
int choose_states_per_lane(int nstate, int64_t batch, int64_t dim, int sms, int wanted = 0) {
  if (wanted > 0) {
    int npl = std::min(wanted, next_pow2(nstate));
    while (lanes_for(nstate, npl) > 32) npl *= 2;
    return npl;
  }
  int npl = nstate > 128 ? 8 : 4;
  npl = std::min(npl, next_pow2(nstate));
  const int64_t target = static_cast<int64_t>(sms) * 256;
  while (npl > 1 && batch * dim * lanes_for(nstate, npl) < target && lanes_for(nstate, npl / 2) <= 32) npl /= 2;
  return npl;
}

// Shared memory of a prefill block: sB, sC [TT][NP], sDD [TT][CH] float2, sUD, sG, sY [TT][CH]
size_t scan_smem(const ScanParams& p, int npl) {
  return static_cast<size_t>(p.tile) * (2 * p.lanes * npl + 5 * p.chans) * sizeof(float);
}

// The largest tile (<= 64 steps) whose codes a thread can fetch in its registers (kScanItems words of u / delta /
// z, kScanBCWords of B and C) and whose staged values fit 48 KiB of shared memory.
int scan_tile(const ScanParams& p, int npl) {
  const int groups = p.chans / 4, words = (p.nstate + 3) / 4;
  ScanParams q = p;
  q.tile = 64;
  while (q.tile > 2 && (q.tile * groups > kScanThreads * kScanItems || q.tile * words > kScanThreads * kScanBCWords ||
                        scan_smem(q, npl) > 48 * 1024)) {
    q.tile /= 2;
  }
  return q.tile;
}

bool aligned4(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 4 == 0; }

void check_code(const at::Tensor& t, const char* name, int64_t dim) {
  QMAMBA_CHECK(t.is_cuda(), "selective_scan_int8: ", name, " must be a CUDA tensor");
  QMAMBA_CHECK(t.scalar_type() == at::kChar, "selective_scan_int8: ", name, " must hold int8 codes, got ",
               t.scalar_type(), " (quantize it first)");
  QMAMBA_CHECK(t.dim() == dim, "selective_scan_int8: ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like) {
  QMAMBA_CHECK(t.is_cuda() && t.device() == like.device(), "selective_scan_int8: ", name,
               " must be on the device of u (", like.device(), ")");
  QMAMBA_CHECK(t.scalar_type() == at::kFloat, "selective_scan_int8: ", name, " must be float32, got ", t.scalar_type());
  QMAMBA_CHECK(t.sizes() == shape, "selective_scan_int8: ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_scale(const at::Tensor& s, const char* name, const at::Tensor& like) {
  QMAMBA_CHECK(s.is_cuda() && s.device() == like.device() && s.scalar_type() == at::kFloat && s.numel() == 1,
               "selective_scan_int8: ", name, " must be a one-element float32 tensor on the device of u "
               "(a per-tensor scale), got ", s.scalar_type(), " ", s.sizes(), " on ", s.device());
}

void check_out_dtype(at::ScalarType out_dtype) {
  QMAMBA_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
               "selective_scan_int8: out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
}

template <typename T, int ENC>
void launch_scan_npl(const ScanParams& p, int npl, cudaStream_t stream) {
  const dim3 grid((p.dim + p.chans - 1) / p.chans, p.batch);
  const size_t smem = scan_smem(p, npl);
  switch (npl) {
    case 1: launch_overlapped(selective_scan_int8_kernel<T, 1, ENC>, grid, dim3(kScanThreads), smem, stream, p); break;
    case 2: launch_overlapped(selective_scan_int8_kernel<T, 2, ENC>, grid, dim3(kScanThreads), smem, stream, p); break;
    case 4: launch_overlapped(selective_scan_int8_kernel<T, 4, ENC>, grid, dim3(kScanThreads), smem, stream, p); break;
    default: launch_overlapped(selective_scan_int8_kernel<T, 8, ENC>, grid, dim3(kScanThreads), smem, stream, p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A single-scale u compiles without the dual-scale branch (its speed is the baseline the dual path is measured by).
template <typename T>
void launch_scan(const ScanParams& p, int npl, cudaStream_t stream) {
  switch (p.u_dual.enc) {
    case kEncMask: launch_scan_npl<T, kEncMask>(p, npl, stream); break;
    case kEncPiecewise: launch_scan_npl<T, kEncPiecewise>(p, npl, stream); break;
    default: launch_scan_npl<T, kEncSingle>(p, npl, stream); break;
  }
}

// u_encoding: 0 single scale, 1 mask, 2 piecewise; u_outlier_scale / u_mask as that encoding needs them.
DualScaleArgs dual_args(const char* op, int64_t enc, int64_t knee, const std::optional<at::Tensor>& s_out,
                        const std::optional<at::Tensor>& mask, const at::Tensor& u) {
  QMAMBA_CHECK(enc >= kEncSingle && enc <= kEncPiecewise, op, ": u_encoding must be 0 (single), 1 (mask) or 2 "
               "(piecewise), got ", enc);
  QMAMBA_CHECK((enc == kEncSingle) == !s_out.has_value(), op, ": u_outlier_scale goes with a dual-scale u_encoding");
  QMAMBA_CHECK((enc == kEncMask) == mask.has_value(), op, ": u_mask goes with the mask encoding (u_encoding 1) only");
  QMAMBA_CHECK(enc != kEncPiecewise || (knee >= 1 && knee <= 126), op, ": the piecewise knee must be in 1..126, got ",
               knee);
  if (s_out.has_value()) check_scale(*s_out, "u_outlier_scale", u);
  if (mask.has_value()) {
    QMAMBA_CHECK(mask->is_cuda() && mask->device() == u.device() && mask->scalar_type() == at::kByte, op,
                 ": u_mask must be a uint8 CUDA tensor on u's device");
  }
  DualScaleArgs a{};
  a.enc = static_cast<int>(enc);
  a.knee = static_cast<int>(knee);
  a.s_out = s_out.has_value() ? s_out->data_ptr<float>() : nullptr;
  return a;
}

std::vector<at::Tensor> selective_scan_int8(const at::Tensor& u, const at::Tensor& u_scale, const at::Tensor& delta,
                                            const at::Tensor& delta_scale, const at::Tensor& A, const at::Tensor& B,
                                            const at::Tensor& B_scale, const at::Tensor& C, const at::Tensor& C_scale,
                                            const at::Tensor& D, const std::optional<at::Tensor>& z,
                                            const std::optional<at::Tensor>& z_scale,
                                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                            at::ScalarType out_dtype, const std::optional<at::Tensor>& initial_state,
                                            int64_t u_encoding, int64_t u_knee,
                                            const std::optional<at::Tensor>& u_outlier_scale,
                                            const std::optional<at::Tensor>& u_mask, int64_t states_per_lane) {
  check_code(u, "u", 3);
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  check_code(delta, "delta", 3);
  QMAMBA_CHECK(delta.sizes() == u.sizes(), "selective_scan_int8: delta must have u's shape ", u.sizes(), ", got ",
               delta.sizes());
  QMAMBA_CHECK(B.dim() == 3, "selective_scan_int8: B must be (batch, N, L) (Mamba1: no groups), got shape ", B.sizes());
  check_code(B, "B", 3);
  check_code(C, "C", 3);
  const int64_t nstate = B.size(1);
  QMAMBA_CHECK(B.size(0) == batch && B.size(2) == len && C.sizes() == B.sizes(), "selective_scan_int8: B and C must be "
               "(batch, N, L) = (", batch, ", N, ", len, "), got ", B.sizes(), " and ", C.sizes());
  QMAMBA_CHECK(nstate >= 1 && nstate <= kMaxState, "selective_scan_int8: the state size N must be in 1..", kMaxState,
               ", got ", nstate);
  check_float(A, "A", {dim, nstate}, u);
  check_float(D, "D", {dim}, u);
  check_scale(u_scale, "u_scale", u);
  check_scale(delta_scale, "delta_scale", u);
  check_scale(B_scale, "B_scale", u);
  check_scale(C_scale, "C_scale", u);
  QMAMBA_CHECK(z.has_value() == z_scale.has_value(), "selective_scan_int8: give z and z_scale together (or neither)");
  if (z.has_value()) {
    check_code(*z, "z", 3);
    QMAMBA_CHECK(z->sizes() == u.sizes(), "selective_scan_int8: z must have u's shape ", u.sizes(), ", got ",
                 z->sizes());
    check_scale(*z_scale, "z_scale", u);
  }
  if (delta_bias.has_value()) check_float(*delta_bias, "delta_bias", {dim}, u);
  if (initial_state.has_value()) check_float(*initial_state, "initial_state", {batch, dim, nstate}, u);
  check_out_dtype(out_dtype);
  const DualScaleArgs dual = dual_args("selective_scan_int8", u_encoding, u_knee, u_outlier_scale, u_mask, u);
  if (u_mask.has_value()) {
    QMAMBA_CHECK(u_mask->dim() == 3 && u_mask->size(0) == batch && u_mask->size(1) == dim &&
                     u_mask->size(2) == (len + 7) / 8,
                 "selective_scan_int8: u_mask must be (batch, D, ceil(L / 8)) = (", batch, ", ", dim, ", ",
                 (len + 7) / 8, "), got ", u_mask->sizes());
  }
  QMAMBA_CHECK(dim < (1LL << 31) && len < (1LL << 31) && batch < 65536,
               "selective_scan_int8: sizes out of range (batch < 65536, channels and length < 2^31)");

  const c10::cuda::OptionalCUDAGuard guard(u.device());
  // y channel-last: (batch, L, dim) memory seen as (batch, dim, L), so out_proj reads it as (batch * L, dim).
  at::Tensor y = at::empty({batch, len, dim}, u.options().dtype(out_dtype)).transpose(1, 2);
  at::Tensor last = at::empty({batch, dim, nstate}, u.options().dtype(at::kFloat));
  if (batch == 0 || dim == 0) return {y, last};

  ScanParams p{};
  p.u = u.data_ptr<int8_t>();
  p.delta = delta.data_ptr<int8_t>();
  p.z = z.has_value() ? z->data_ptr<int8_t>() : nullptr;
  p.B = B.data_ptr<int8_t>();
  p.C = C.data_ptr<int8_t>();
  p.u_scale = u_scale.data_ptr<float>();
  p.delta_scale = delta_scale.data_ptr<float>();
  p.z_scale = z.has_value() ? z_scale->data_ptr<float>() : nullptr;
  p.B_scale = B_scale.data_ptr<float>();
  p.C_scale = C_scale.data_ptr<float>();
  p.A = A.data_ptr<float>();
  p.D = D.data_ptr<float>();
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.h0 = initial_state.has_value() ? initial_state->data_ptr<float>() : nullptr;
  p.u_dual = dual;
  p.u_mask = u_mask.has_value() ? u_mask->data_ptr<uint8_t>() : nullptr;
  if (u_mask.has_value()) p.um_sb = u_mask->stride(0), p.um_sd = u_mask->stride(1), p.um_sl = u_mask->stride(2);
  p.y = y.data_ptr();
  p.last = last.data_ptr<float>();
  p.batch = static_cast<int>(batch);
  p.dim = static_cast<int>(dim);
  p.len = static_cast<int>(len);
  p.nstate = static_cast<int>(nstate);
  p.u_sb = u.stride(0), p.u_sd = u.stride(1), p.u_sl = u.stride(2);
  p.dl_sb = delta.stride(0), p.dl_sd = delta.stride(1), p.dl_sl = delta.stride(2);
  if (z.has_value()) p.z_sb = z->stride(0), p.z_sd = z->stride(1), p.z_sl = z->stride(2);
  p.B_sb = B.stride(0), p.B_sn = B.stride(1), p.B_sl = B.stride(2);
  p.C_sb = C.stride(0), p.C_sn = C.stride(1), p.C_sl = C.stride(2);
  p.A_sd = A.stride(0), p.A_sn = A.stride(1);
  p.D_s = D.stride(0);
  if (delta_bias.has_value()) p.bias_s = delta_bias->stride(0);
  if (initial_state.has_value()) {
    p.h0_sb = initial_state->stride(0), p.h0_sd = initial_state->stride(1), p.h0_sn = initial_state->stride(2);
  }
  p.y_sb = y.stride(0), p.y_sd = y.stride(1), p.y_sl = y.stride(2);
  p.softplus = delta_softplus;

  // word loads / vector stores where the layout allows them (the mixer's channel-last views do: u, delta, z with
  // channel stride 1 and 4-aligned rows, B / C with state stride 1, y as allocated above), bytes otherwise
  const bool dim4 = dim % 4 == 0;
  auto chan_vec = [&](const at::Tensor& t) {
    return dim4 && t.stride(1) == 1 && t.stride(0) % 4 == 0 && t.stride(2) % 4 == 0 && aligned4(t.data_ptr());
  };
  p.vec_u = chan_vec(u);
  p.vec_delta = chan_vec(delta);
  p.vec_z = z.has_value() && chan_vec(*z);
  p.vec_bc = nstate % 4 == 0 && B.stride(1) == 1 && C.stride(1) == 1 && B.stride(0) % 4 == 0 &&
             B.stride(2) % 4 == 0 && C.stride(0) % 4 == 0 && C.stride(2) % 4 == 0 && aligned4(B.data_ptr()) &&
             aligned4(C.data_ptr());
  p.vec_y = dim4 && p.y_sd == 1;  // y: channel-last, allocated here (aligned)

  QMAMBA_CHECK(states_per_lane == 0 || states_per_lane == 1 || states_per_lane == 2 || states_per_lane == 4 ||
                   states_per_lane == 8,
               "selective_scan_int8: states_per_lane must be 0 (the kernel picks) or 1, 2, 4, 8, got ",
               states_per_lane);
  const int npl = choose_states_per_lane(p.nstate, batch, dim, sm_count(u.get_device()),
                                         static_cast<int>(states_per_lane));
  p.lanes = lanes_for(p.nstate, npl);
  p.chans = kScanThreads / p.lanes;
  p.tile = scan_tile(p, npl);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (out_dtype) {
    case at::kFloat: launch_scan<float>(p, npl, stream); break;
    case at::kHalf: launch_scan<at::Half>(p, npl, stream); break;
    default: launch_scan<at::BFloat16>(p, npl, stream); break;
  }
  return {y, last};
}

// The fused dt_proj's arguments (dt given): dt (batch, R) int8 with a contiguous last dim, dt_scale one element,
// dt_weight (D, R) int8 contiguous, dt_weight_scale 1 or D fp32, dt_bias (D,) fp32 or none. Fills p's dt fields.
void dt_proj_args(UpdateParams& p, const at::Tensor& u, const at::Tensor& dt,
                  const std::optional<at::Tensor>& dt_scale, const std::optional<at::Tensor>& dt_weight,
                  const std::optional<at::Tensor>& dt_weight_scale, const std::optional<at::Tensor>& dt_bias) {
  const int64_t batch = u.size(0), dim = u.size(1);
  QMAMBA_CHECK(dt_scale.has_value() && dt_weight.has_value() && dt_weight_scale.has_value(),
               "selective_scan_int8_update: dt (the fused dt_proj's input codes) needs dt_scale, dt_weight and "
               "dt_weight_scale too");
  check_code(dt, "dt", 2);
  const int64_t rank = dt.size(1);
  QMAMBA_CHECK(dt.size(0) == batch && rank >= 1 && (dt.stride(1) == 1 || rank == 1),
               "selective_scan_int8_update: dt must be (batch, R) = (", batch, ", R >= 1) with a contiguous last dim, "
               "got shape ", dt.sizes(), " strides ", dt.strides());
  const at::Tensor& w = *dt_weight;
  check_code(w, "dt_weight", 2);
  QMAMBA_CHECK(w.size(0) == dim && w.size(1) == rank && w.is_contiguous(), "selective_scan_int8_update: dt_weight "
               "must be dt_proj's contiguous (D, R) = (", dim, ", ", rank, ") int8 weight, got ", w.sizes());
  check_scale(*dt_scale, "dt_scale", u);
  const at::Tensor& ws = *dt_weight_scale;
  QMAMBA_CHECK(ws.is_cuda() && ws.device() == u.device() && ws.scalar_type() == at::kFloat && ws.is_contiguous() &&
                   (ws.numel() == 1 || ws.numel() == dim),
               "selective_scan_int8_update: dt_weight_scale must be a contiguous float32 tensor of 1 (per-tensor) or "
               "D=", dim, " (per-channel) elements on the device of u, got ", ws.sizes(), " ", ws.scalar_type());
  if (dt_bias.has_value()) check_float(*dt_bias, "dt_bias", {dim}, u);
  // the int32 accumulator holds R products of at most 128 * 128 (DESIGN §3)
  QMAMBA_CHECK(rank * 128 * 128 < (int64_t(1) << 31), "selective_scan_int8_update: dt_rank R=", rank,
               " could overflow the int32 accumulator (needs R < 131072)");
  p.dt = dt.data_ptr<int8_t>();
  p.dt_w = w.data_ptr<int8_t>();
  p.dt_scale = dt_scale->data_ptr<float>();
  p.dt_w_scale = ws.data_ptr<float>();
  p.dt_bias = dt_bias.has_value() ? dt_bias->data_ptr<float>() : nullptr;
  p.dt_sb = dt.stride(0);
  p.dt_bias_s = dt_bias.has_value() ? dt_bias->stride(0) : 0;
  p.dt_rank = static_cast<int>(rank);
  p.dt_w_per_channel = ws.numel() > 1;
  // 16-byte loads where every row starts 16-byte aligned (x_proj's output rows do: R + 2N is a multiple of 16 in
  // the Mamba configs), else the byte loop: one flag for the launch, so every thread takes the same path
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  p.dt_vec = rank % 16 == 0 && aligned(p.dt) && aligned(p.dt_w) && (batch == 1 || p.dt_sb % 16 == 0);
}

template <int KP>
void launch_update(const UpdateParams& p, at::ScalarType out_dtype, int64_t dim, int64_t batch, cudaStream_t stream) {
  constexpr int kChans = kUpdateThreads / KP;
  const dim3 grid((dim + kChans - 1) / kChans, batch), block(kUpdateThreads);
  auto go = [&](auto kernel) { launch_overlapped(kernel, grid, block, 0, stream, p); };
  const bool rotate = p.hq_out != nullptr;
  switch (out_dtype) {
    case at::kFloat:
      rotate ? go(selective_scan_int8_update_kernel<float, KP, true>)
             : go(selective_scan_int8_update_kernel<float, KP, false>);
      break;
    case at::kHalf:
      rotate ? go(selective_scan_int8_update_kernel<at::Half, KP, true>)
             : go(selective_scan_int8_update_kernel<at::Half, KP, false>);
      break;
    default:
      rotate ? go(selective_scan_int8_update_kernel<at::BFloat16, KP, true>)
             : go(selective_scan_int8_update_kernel<at::BFloat16, KP, false>);
      break;
  }
}

// The channels of one Hadamard block of a rotated update's output (dim's largest power-of-two divisor, as
// qmamba.ops.hadamard.hadamard_block), or an error naming why the update cannot rotate this shape.
int rotated_block_log2(int64_t dim, int kp) {
  const int64_t hb = dim & -dim;
  const int64_t chans = kUpdateThreads / kp;
  QMAMBA_CHECK(hb >= 8 && hb >= chans && hb <= 8 * kUpdateThreads, "selective_scan_int8_update: out_scale (the "
               "rotated output) needs Hadamard blocks of 8..", 8 * kUpdateThreads, " channels and at least ", chans,
               " (the channels of one update block at this state size), got ", hb, " (D = ", dim, "); run "
               "hadamard_quantize on y instead");
  return block_log2(hb);
}

std::vector<at::Tensor> selective_scan_int8_update(at::Tensor& state, const at::Tensor& u, const at::Tensor& u_scale,
                                      const std::optional<at::Tensor>& delta, const at::Tensor& delta_scale,
                                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& B_scale,
                                      const at::Tensor& C, const at::Tensor& C_scale, const at::Tensor& D,
                                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& z_scale,
                                      const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                      at::ScalarType out_dtype, int64_t u_encoding, int64_t u_knee,
                                      const std::optional<at::Tensor>& u_outlier_scale,
                                      const std::optional<at::Tensor>& u_mask, const std::optional<at::Tensor>& dt,
                                      const std::optional<at::Tensor>& dt_scale,
                                      const std::optional<at::Tensor>& dt_weight,
                                      const std::optional<at::Tensor>& dt_weight_scale,
                                      const std::optional<at::Tensor>& dt_bias,
                                      const std::optional<at::Tensor>& out_scale, int64_t out_bits,
                                      const std::optional<at::Tensor>& out_counters) {
  check_code(u, "u", 2);
  const int64_t batch = u.size(0), dim = u.size(1);
  QMAMBA_CHECK(delta.has_value() != dt.has_value(), "selective_scan_int8_update: give exactly one of delta (the delta "
               "codes) and dt (dt_proj's input codes, dt_proj fused), got ", delta.has_value() ? "both" : "neither");
  QMAMBA_CHECK(dt.has_value() || !(dt_scale.has_value() || dt_weight.has_value() || dt_weight_scale.has_value() ||
                                   dt_bias.has_value()),
               "selective_scan_int8_update: dt_scale, dt_weight, dt_weight_scale and dt_bias go with dt only");
  if (delta.has_value()) {
    check_code(*delta, "delta", 2);
    QMAMBA_CHECK(delta->sizes() == u.sizes(), "selective_scan_int8_update: delta must have u's shape (batch, D) ",
                 u.sizes(), ", got ", delta->sizes());
  }
  check_code(B, "B", 2);
  check_code(C, "C", 2);
  const int64_t nstate = B.size(1);
  QMAMBA_CHECK(B.size(0) == batch && C.sizes() == B.sizes(), "selective_scan_int8_update: B and C must be (batch, N) "
               "with batch ", batch, ", got ", B.sizes(), " and ", C.sizes());
  QMAMBA_CHECK(nstate >= 1 && nstate <= kMaxState, "selective_scan_int8_update: the state size N must be in 1..",
               kMaxState, ", got ", nstate);
  check_float(state, "state", {batch, dim, nstate}, u);
  check_float(A, "A", {dim, nstate}, u);
  check_float(D, "D", {dim}, u);
  check_scale(u_scale, "u_scale", u);
  check_scale(delta_scale, "delta_scale", u);
  check_scale(B_scale, "B_scale", u);
  check_scale(C_scale, "C_scale", u);
  QMAMBA_CHECK(z.has_value() == z_scale.has_value(),
               "selective_scan_int8_update: give z and z_scale together (or neither)");
  if (z.has_value()) {
    check_code(*z, "z", 2);
    QMAMBA_CHECK(z->sizes() == u.sizes(), "selective_scan_int8_update: z must have u's shape ", u.sizes(), ", got ",
                 z->sizes());
    check_scale(*z_scale, "z_scale", u);
  }
  if (delta_bias.has_value()) check_float(*delta_bias, "delta_bias", {dim}, u);
  check_out_dtype(out_dtype);
  const DualScaleArgs dual = dual_args("selective_scan_int8_update", u_encoding, u_knee, u_outlier_scale, u_mask, u);
  if (u_mask.has_value()) {
    QMAMBA_CHECK(u_mask->dim() == 2 && u_mask->size(0) == batch && u_mask->size(1) == dim,
                 "selective_scan_int8_update: u_mask must be (batch, D) (one byte per element, the flag in bit 0), "
                 "got ", u_mask->sizes());
  }
  QMAMBA_CHECK(batch < 65536 && dim < (1LL << 31), "selective_scan_int8_update: batch must be < 65536");
  UpdateParams p{};
  if (dt.has_value()) dt_proj_args(p, u, *dt, dt_scale, dt_weight, dt_weight_scale, dt_bias);

  // out_scale: also the codes of hadamard_quantize(y, out_scale, out_bits) (out_proj's rotated input), made here
  QMAMBA_CHECK(out_scale.has_value() == out_counters.has_value(), "selective_scan_int8_update: give out_scale and "
               "out_counters together (or neither)");
  const int kp = std::min(32, next_pow2(static_cast<int>(nstate)));  // lanes per channel (see launch_update)
  int hq_log_b = 0;
  if (out_scale.has_value()) {
    check_scale(*out_scale, "out_scale", u);
    QMAMBA_CHECK(out_bits >= 2 && out_bits <= 8, "selective_scan_int8_update: out_bits must be in 2..8, got ",
                 out_bits);
    hq_log_b = rotated_block_log2(dim, kp);
    const at::Tensor& cnt = *out_counters;
    QMAMBA_CHECK(cnt.is_cuda() && cnt.device() == u.device() && cnt.scalar_type() == at::kInt &&
                     cnt.is_contiguous() && cnt.numel() == batch * (dim >> hq_log_b),
                 "selective_scan_int8_update: out_counters must be a contiguous int32 tensor of batch * D / block = ",
                 batch * (dim >> hq_log_b), " zeros on the device of u (the update leaves them zero), got ",
                 cnt.scalar_type(), " ", cnt.sizes());
  }

  const c10::cuda::OptionalCUDAGuard guard(u.device());
  at::Tensor y = at::empty({batch, dim}, u.options().dtype(out_dtype));
  std::vector<at::Tensor> results{y};
  if (out_scale.has_value()) {
    results.push_back(at::empty({batch, dim}, u.options().dtype(at::kChar)));
    p.hq_out = results[1].data_ptr<int8_t>();
    p.hq_scale = out_scale->data_ptr<float>();
    p.hq_counters = out_counters->data_ptr<int>();
    p.hq_log_b = hq_log_b;
    p.hq_qmin = -(1 << (out_bits - 1));
    p.hq_qmax = (1 << (out_bits - 1)) - 1;
    p.hq_rsqrt_b = block_rsqrt(int64_t(1) << hq_log_b);  // as hadamard_quantize's launch
    p.hq_vec = ((int64_t(1) << hq_log_b) * static_cast<int64_t>(at::elementSize(out_dtype))) % 16 == 0;
  }
  if (batch == 0 || dim == 0) return results;

  p.state = state.data_ptr<float>();
  p.u = u.data_ptr<int8_t>();
  p.delta = delta.has_value() ? delta->data_ptr<int8_t>() : nullptr;
  p.z = z.has_value() ? z->data_ptr<int8_t>() : nullptr;
  p.B = B.data_ptr<int8_t>();
  p.C = C.data_ptr<int8_t>();
  p.u_scale = u_scale.data_ptr<float>();
  p.delta_scale = delta_scale.data_ptr<float>();
  p.z_scale = z.has_value() ? z_scale->data_ptr<float>() : nullptr;
  p.B_scale = B_scale.data_ptr<float>();
  p.C_scale = C_scale.data_ptr<float>();
  p.A = A.data_ptr<float>();
  p.D = D.data_ptr<float>();
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.u_dual = dual;
  p.u_mask = u_mask.has_value() ? u_mask->data_ptr<uint8_t>() : nullptr;
  if (u_mask.has_value()) p.um_sb = u_mask->stride(0), p.um_sd = u_mask->stride(1);
  p.y = y.data_ptr();
  p.batch = static_cast<int>(batch);
  p.dim = static_cast<int>(dim);
  p.nstate = static_cast<int>(nstate);
  p.st_sb = state.stride(0), p.st_sd = state.stride(1), p.st_sn = state.stride(2);
  p.u_sb = u.stride(0), p.u_sd = u.stride(1);
  if (delta.has_value()) p.dl_sb = delta->stride(0), p.dl_sd = delta->stride(1);
  if (z.has_value()) p.z_sb = z->stride(0), p.z_sd = z->stride(1);
  p.B_sb = B.stride(0), p.B_sn = B.stride(1);
  p.C_sb = C.stride(0), p.C_sn = C.stride(1);
  p.A_sd = A.stride(0), p.A_sn = A.stride(1);
  p.D_s = D.stride(0);
  if (delta_bias.has_value()) p.bias_s = delta_bias->stride(0);
  p.softplus = delta_softplus;

  // KP lanes per channel (kp above): the state size rounded up to a power of two, at most a warp (then 8 states a
  // lane)
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (kp) {
    case 1: launch_update<1>(p, out_dtype, dim, batch, stream); break;
    case 2: launch_update<2>(p, out_dtype, dim, batch, stream); break;
    case 4: launch_update<4>(p, out_dtype, dim, batch, stream); break;
    case 8: launch_update<8>(p, out_dtype, dim, batch, stream); break;
    case 16: launch_update<16>(p, out_dtype, dim, batch, stream); break;
    default: launch_update<32>(p, out_dtype, dim, batch, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return results;
}

}  // namespace
}  // namespace qmamba

TORCH_LIBRARY_FRAGMENT(qmamba, m) {
  m.def("selective_scan_int8(Tensor u, Tensor u_scale, Tensor delta, Tensor delta_scale, Tensor A, Tensor B, "
        "Tensor B_scale, Tensor C, Tensor C_scale, Tensor D, Tensor? z, Tensor? z_scale, Tensor? delta_bias, "
        "bool delta_softplus, ScalarType out_dtype, Tensor? initial_state, int u_encoding, int u_knee, "
        "Tensor? u_outlier_scale, Tensor? u_mask, int states_per_lane) -> Tensor[]");
  // delta: the delta codes, or None with dt (and dt_scale, dt_weight, dt_weight_scale, dt_bias): dt_proj fused;
  // out_scale (with out_bits, out_counters): also out_proj's rotated input codes -> [y, codes], else [y]
  m.def("selective_scan_int8_update(Tensor(a!) state, Tensor u, Tensor u_scale, Tensor? delta, Tensor delta_scale, "
        "Tensor A, Tensor B, Tensor B_scale, Tensor C, Tensor C_scale, Tensor D, Tensor? z, Tensor? z_scale, "
        "Tensor? delta_bias, bool delta_softplus, ScalarType out_dtype, int u_encoding, int u_knee, "
        "Tensor? u_outlier_scale, Tensor? u_mask, Tensor? dt, Tensor? dt_scale, Tensor? dt_weight, "
        "Tensor? dt_weight_scale, Tensor? dt_bias, Tensor? out_scale, int out_bits, Tensor(b!)? out_counters) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(qmamba, CUDA, m) {
  m.impl("selective_scan_int8", &qmamba::selective_scan_int8);
  m.impl("selective_scan_int8_update", &qmamba::selective_scan_int8_update);
}
