// CUDA kernels of the fused DIGA loss (see diga_loss.h for the semantics).
//
// One warp per student token (kWarps tokens per block), 16-byte vector loads and stores where the rows allow.
// The forward streams the student row and the (up to four) teacher rows it samples once and reduces a.t, |a|^2,
// |t|^2 and the two largest magnitudes in fp32 with warp shuffles; a warp whose sums overflowed (features near
// fp32's range, never in practice) reads its rows again divided by those magnitudes. It writes the loss and
// three coefficients per token. The backward streams the same rows once and writes
// grad = grad_loss * inv_a * (c_a * a - inv_t * t), the incoming gradient applied inside the kernel, saturated to
// the storage type's range. Nothing synchronises with the host. Torch-free: raw pointers and a cudaStream_t.
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
struct Device;  // storage type -> CUDA type
template <>
struct Device<float> {
  using type = float;
};
template <>
struct Device<Half> {
  using type = __half;
};
template <>
struct Device<BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

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
    for (int j = 0; j < VEC; ++j) out[j] = to_f(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f(p[j]);
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

// The rows one token reads: its student row and the four teacher rows with their bilinear weights.
template <typename T>
struct TokenRows {
  const T* a;
  const T* r00;
  const T* r01;
  const T* r10;
  const T* r11;
  float h0, h1, w0, w1;
  bool single;  // one teacher row (identical grids or an exact hit)

  // The sampled teacher values at elements [d, d + VEC), in ATen's order h0*(w0*a + w1*b) + h1*(...).
  template <int VEC>
  __device__ __forceinline__ void teacher(int64_t d, float (&t)[VEC]) const {
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
};

// Locates token i: its image (binary search over the table, warp-uniform) and its rows. Returns false when the
// table row would index outside [0, n_tokens) or [0, n_teacher) (a malformed table): nothing is read then.
template <typename T>
__device__ __forceinline__ bool locate(const T* __restrict__ student, const T* __restrict__ teacher,
                                       const int64_t* __restrict__ table, int64_t n_images, int64_t n_teacher,
                                       int64_t s_stride, int64_t t_stride, int64_t i, TokenRows<T>* out) {
  int64_t lo = 0, hi = n_images - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * kTableCols + kStudentOffset] <= i) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * kTableCols;
  const int64_t hs = row[kHs], ws = row[kWs], ht = row[kHt], wt = row[kWt], toff = row[kTeacherOffset];
  const int64_t local = i - row[kStudentOffset];
  // Sizes positive and small enough that their products cannot wrap (each below 2^31), the token inside its
  // image, the image's teacher tokens inside the teacher.
  const int64_t lim = int64_t(1) << 31;
  if (hs <= 0 || ws <= 0 || ht <= 0 || wt <= 0 || hs >= lim || ws >= lim || ht >= lim || wt >= lim ||
      local < 0 || local >= hs * ws || toff < 0 || toff > n_teacher - ht * wt) {
    return false;
  }
  int64_t y0, y1, x0, x1;
  source_index(ht, hs, local / ws, &y0, &y1, &out->h0, &out->h1);
  source_index(wt, ws, local % ws, &x0, &x1, &out->w0, &out->w1);
  const T* tb = teacher + toff * t_stride;
  out->a = student + i * s_stride;
  out->r00 = tb + (y0 * wt + x0) * t_stride;
  out->r01 = tb + (y0 * wt + x1) * t_stride;
  out->r10 = tb + (y1 * wt + x0) * t_stride;
  out->r11 = tb + (y1 * wt + x1) * t_stride;
  out->single = out->h1 == 0.0f && out->w1 == 0.0f;
  return true;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sums over the row (of a * s[0] * s[1] and t * s[2] * s[3] when kScaled: exact power-of-two factors from
// pow2_scale), reduced over the warp; every lane gets the totals.
template <bool kScaled, typename T, int VEC>
__device__ __forceinline__ void row_sums(const TokenRows<T>& r, int64_t dim, int lane, const float (&s)[4],
                                         float* dot, float* aa, float* tt, float* amax, float* tmax) {
  float d0 = 0.f, a0 = 0.f, t0 = 0.f, am = 0.f, tm = 0.f;
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < dim; d += kWarpSize * VEC) {
    float a[VEC], t[VEC];
    load_vec<T, VEC>(r.a + d, a);
    r.template teacher<VEC>(d, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float av = kScaled ? a[j] * s[0] * s[1] : a[j];
      const float tv = kScaled ? t[j] * s[2] * s[3] : t[j];
      d0 = fmaf(av, tv, d0);
      a0 = fmaf(av, av, a0);
      t0 = fmaf(tv, tv, t0);
      am = fmaxf(am, fabsf(av));
      tm = fmaxf(tm, fabsf(tv));
    }
  }
  *dot = warp_sum(d0);
  *aa = warp_sum(a0);
  *tt = warp_sum(t0);
  *amax = warp_max(am);
  *tmax = warp_max(tm);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    diga_loss_fwd_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                         const int64_t* __restrict__ table, int64_t n_images, int64_t n_tokens, int64_t n_teacher,
                         int64_t dim, int64_t s_stride, int64_t t_stride, float* __restrict__ loss,
                         float* __restrict__ coef) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (i >= n_tokens) return;
  TokenRows<T> r;
  if (!locate(student, teacher, table, n_images, n_teacher, s_stride, t_stride, i, &r)) {
    if (lane == 0) {
      loss[i] = __int_as_float(0x7fc00000);  // NaN: a malformed table, see diga_loss.h
      if (coef != nullptr) coef[i * kCoefCols] = coef[i * kCoefCols + 1] = coef[i * kCoefCols + 2] = 0.0f;
    }
    return;
  }
  float dot, aa, tt, amax, tmax;
  float s[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  row_sums<false, T, VEC>(r, dim, lane, s, &dot, &aa, &tt, &amax, &tmax);
  float sa = 1.0f, st = 1.0f;
  if (needs_rescale(dot, aa, tt, amax, tmax)) {  // warp-uniform: every lane holds the reduced sums
    pow2_scale(amax, &sa, &s[0], &s[1]);
    pow2_scale(tmax, &st, &s[2], &s[3]);
    row_sums<true, T, VEC>(r, dim, lane, s, &dot, &aa, &tt, &amax, &tmax);
  }
  if (lane == 0) finish(dot, aa, tt, sa, st, loss + i, coef != nullptr ? coef + i * kCoefCols : nullptr);
}

template <typename T, typename S, int VEC>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    diga_loss_bwd_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                         const int64_t* __restrict__ table, int64_t n_images, int64_t n_tokens, int64_t n_teacher,
                         int64_t dim, int64_t s_stride, int64_t t_stride, const float* __restrict__ coef,
                         const float* __restrict__ grad_loss, int64_t gl_stride, T* __restrict__ grad) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (i >= n_tokens) return;
  T* g_row = grad + i * dim;
  TokenRows<T> r;
  if (!locate(student, teacher, table, n_images, n_teacher, s_stride, t_stride, i, &r)) {
    for (int64_t d = lane; d < dim; d += kWarpSize) g_row[d] = from_f<T>(__int_as_float(0x7fc00000));
    return;
  }
  // k * (c_a * a - inv_t * t): the bracket is O(1) at any magnitude (see the CPU kernel).
  const float k = grad_loss[i * gl_stride] * coef[i * kCoefCols];
  const float ca = coef[i * kCoefCols + 2], it = coef[i * kCoefCols + 1];
  const float lim = max_finite<S>();
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < dim; d += kWarpSize * VEC) {
    float a[VEC], t[VEC], g[VEC];
    load_vec<T, VEC>(r.a + d, a);
    r.template teacher<VEC>(d, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = saturate(k * (ca * a[j] - it * t[j]), lim);
    store_vec<T, VEC>(g_row + d, g);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte accesses need every row start aligned: aligned bases, and dim and strides multiples of kVec.
template <typename T>
bool vector_ok(const Rows& p, const void* grad) {
  constexpr int kVec = 16 / sizeof(T);
  return p.dim % kVec == 0 && p.student_stride % kVec == 0 && p.teacher_stride % kVec == 0 &&
         aligned16(p.student) && aligned16(p.teacher) && aligned16(grad);
}

template <typename S>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using T = typename Device<S>::type;
  constexpr int kVec = 16 / sizeof(T);
  const Rows& r = p.rows;
  const T* s = static_cast<const T*>(r.student);
  const T* t = static_cast<const T*>(r.teacher);
  const dim3 block(kWarps * kWarpSize), grid(static_cast<unsigned>((r.n_tokens + kWarps - 1) / kWarps));
  if (vector_ok<T>(r, nullptr)) {
    diga_loss_fwd_kernel<T, kVec><<<grid, block, 0, stream>>>(s, t, r.table, r.n_images, r.n_tokens, r.n_teacher,
                                                               r.dim, r.student_stride, r.teacher_stride, p.loss,
                                                               p.coef);
  } else {
    diga_loss_fwd_kernel<T, 1><<<grid, block, 0, stream>>>(s, t, r.table, r.n_images, r.n_tokens, r.n_teacher,
                                                            r.dim, r.student_stride, r.teacher_stride, p.loss,
                                                            p.coef);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using T = typename Device<S>::type;
  constexpr int kVec = 16 / sizeof(T);
  const Rows& r = p.rows;
  const T* s = static_cast<const T*>(r.student);
  const T* t = static_cast<const T*>(r.teacher);
  T* g = static_cast<T*>(p.grad);
  const dim3 block(kWarps * kWarpSize), grid(static_cast<unsigned>((r.n_tokens + kWarps - 1) / kWarps));
  if (vector_ok<T>(r, g)) {
    diga_loss_bwd_kernel<T, S, kVec><<<grid, block, 0, stream>>>(s, t, r.table, r.n_images, r.n_tokens,
                                                                  r.n_teacher, r.dim, r.student_stride,
                                                                  r.teacher_stride, p.coef, p.grad_loss,
                                                                  p.grad_loss_stride, g);
  } else {
    diga_loss_bwd_kernel<T, S, 1><<<grid, block, 0, stream>>>(s, t, r.table, r.n_images, r.n_tokens, r.n_teacher,
                                                               r.dim, r.student_stride, r.teacher_stride, p.coef,
                                                               p.grad_loss, p.grad_loss_stride, g);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t diga_loss_fwd_cuda(DType dtype, const FwdParams& p, cudaStream_t stream) {
  if (p.rows.n_tokens == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd<float>(p, stream);
    case DType::kFloat16:
      return launch_fwd<Half>(p, stream);
    case DType::kBFloat16:
      return launch_fwd<BFloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t diga_loss_bwd_cuda(DType dtype, const BwdParams& p, cudaStream_t stream) {
  if (p.rows.n_tokens == 0 || p.rows.dim == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(p, stream);
    case DType::kFloat16:
      return launch_bwd<Half>(p, stream);
    case DType::kBFloat16:
      return launch_bwd<BFloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace diga
}  // namespace unigendet
