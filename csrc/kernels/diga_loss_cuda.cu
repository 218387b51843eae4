// CUDA kernel of the fused DIGA loss (see diga_loss.h for the semantics).
//
// One warp per student token (kWarps tokens per block). Pass 1 streams the student row and the four
// teacher rows it samples with 16-byte vector loads and reduces a.t, |a|^2, |t|^2 in fp32 with warp
// shuffles; pass 2 re-reads the same rows (L1/L2 hits: a row of 3584 bf16 is 7 KiB) and writes the
// gradient with 16-byte stores. The loss and the gradient therefore come out of one launch that reads
// each input row from HBM about once. Torch-free: raw pointers and a cudaStream_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/diga_loss.h"

namespace unigendet {
namespace diga {
namespace {

constexpr int kWarps = 8;  // tokens per block
constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements as fp32; VEC * sizeof(T) == 16 uses one 128-bit read-only load.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f<T>(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f<T>(p[j]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) e[j] = from_f<T>(v[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = from_f<T>(v[j]);
  }
}

// The sampled teacher values at elements [d, d + VEC), in ATen's order h0*(w0*a + w1*b) + h1*(...).
template <typename T, int VEC>
__device__ __forceinline__ void sample_vec(const T* r00, const T* r01, const T* r10, const T* r11, bool single,
                                           float h0, float h1, float w0, float w1, int64_t d, float (&t)[VEC]) {
  load_vec<T, VEC>(r00 + d, t);
  if (!single) {
    float b[VEC], c[VEC], e[VEC];
    load_vec<T, VEC>(r01 + d, b);
    load_vec<T, VEC>(r10 + d, c);
    load_vec<T, VEC>(r11 + d, e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) t[j] = h0 * (w0 * t[j] + w1 * b[j]) + h1 * (w0 * c[j] + w1 * e[j]);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    diga_loss_kernel(const T* __restrict__ student, const T* __restrict__ teacher, const int64_t* __restrict__ table,
                     const float* __restrict__ weight, float grad_scale, int64_t n_images, int64_t n_tokens,
                     int64_t dim, int64_t s_stride, int64_t t_stride, float* __restrict__ loss,
                     T* __restrict__ grad) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (i >= n_tokens) return;

  // The image of token i: the last one whose student offset is <= i (binary search, warp-uniform).
  int64_t lo = 0, hi = n_images - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * kTableCols + kStudentOffset] <= i) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * kTableCols;
  const int64_t hs = row[kHs], ws = row[kWs], ht = row[kHt], wt = row[kWt];
  const int64_t local = i - row[kStudentOffset];
  int64_t y0, y1, x0, x1;
  float h0, h1, w0, w1;
  source_index(ht, hs, local / ws, &y0, &y1, &h0, &h1);
  source_index(wt, ws, local % ws, &x0, &x1, &w0, &w1);
  const T* tb = teacher + row[kTeacherOffset] * t_stride;
  const T* r00 = tb + (y0 * wt + x0) * t_stride;
  const T* r01 = tb + (y0 * wt + x1) * t_stride;
  const T* r10 = tb + (y1 * wt + x0) * t_stride;
  const T* r11 = tb + (y1 * wt + x1) * t_stride;
  const bool single = h1 == 0.0f && w1 == 0.0f;
  const T* a_row = student + i * s_stride;

  float dot = 0.f, aa = 0.f, tt = 0.f;
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < dim; d += kWarpSize * VEC) {
    float a[VEC], t[VEC];
    load_vec<T, VEC>(a_row + d, a);
    sample_vec<T, VEC>(r00, r01, r10, r11, single, h0, h1, w0, w1, d, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dot = fmaf(a[j], t[j], dot);
      aa = fmaf(a[j], a[j], aa);
      tt = fmaf(t[j], t[j], tt);
    }
  }
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, off);
    aa += __shfl_xor_sync(0xffffffffu, aa, off);
    tt += __shfl_xor_sync(0xffffffffu, tt, off);
  }
  const float na = sqrtf(aa), nt = sqrtf(tt);
  const float inv = 1.0f / (fmaxf(na, kEps) * fmaxf(nt, kEps));
  if (lane == 0) loss[i] = 1.0f - dot * inv;
  if (grad == nullptr) return;

  // d(1 - cos)/da = -(t - [|a| > eps] * (a.t / |a|^2) * a) / (max(|a|,eps) * max(|t|,eps)).
  const float scale = grad_scale * (weight != nullptr ? weight[i] : 1.0f);
  const float coef_t = -scale * inv;
  const float coef_a = na > kEps ? scale * inv * dot / aa : 0.0f;
  T* g_row = grad + i * dim;
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < dim; d += kWarpSize * VEC) {
    float a[VEC], t[VEC], g[VEC];
    load_vec<T, VEC>(a_row + d, a);
    sample_vec<T, VEC>(r00, r01, r10, r11, single, h0, h1, w0, w1, d, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = coef_t * t[j] + coef_a * a[j];
    store_vec<T, VEC>(g_row + d, g);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* s = static_cast<const T*>(p.student);
  const T* t = static_cast<const T*>(p.teacher);
  T* g = static_cast<T*>(p.grad);
  const dim3 block(kWarps * kWarpSize);
  const dim3 grid(static_cast<unsigned>((p.n_tokens + kWarps - 1) / kWarps));
  // 16-byte accesses need every row start aligned: aligned bases, and dim and strides multiples of kVec.
  const bool vec_ok = p.dim % kVec == 0 && p.student_stride % kVec == 0 && p.teacher_stride % kVec == 0 &&
                      aligned16(s) && aligned16(t) && aligned16(g);
  if (vec_ok) {
    diga_loss_kernel<T, kVec><<<grid, block, 0, stream>>>(s, t, p.table, p.weight, p.grad_scale, p.n_images,
                                                           p.n_tokens, p.dim, p.student_stride, p.teacher_stride,
                                                           p.loss, g);
  } else {
    diga_loss_kernel<T, 1><<<grid, block, 0, stream>>>(s, t, p.table, p.weight, p.grad_scale, p.n_images,
                                                        p.n_tokens, p.dim, p.student_stride, p.teacher_stride,
                                                        p.loss, g);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t diga_loss_cuda(DType dtype, const Params& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(p, stream);
    case DType::kFloat16:
      return launch<__half>(p, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace diga
}  // namespace unigendet
