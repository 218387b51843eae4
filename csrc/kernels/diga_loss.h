// Fused DIGA alignment loss: 1 - cos(student, bilinear(teacher)) per student token, forward and backward.
//
// A packed batch holds several images. Image b has h_s x w_s student tokens and h_t x w_t teacher
// tokens, both row-major, and the images are concatenated along the token axis. Each student token
// samples the teacher grid bilinearly at its own position with the align_corners=False rule of
// torch.nn.functional.interpolate(mode="bilinear"):
//
//     src = max((dst + 0.5) * in / out - 0.5, 0),  i0 = min(floor(src), in - 1),
//     i1 = min(i0 + 1, in - 1),  lambda1 = src - i0,  lambda0 = 1 - lambda1
//
// (equal sizes copy), and the loss is 1 - cos with cos = a.t / (max(|a|, eps) * max(|t|, eps)), eps = 1e-8,
// the convention of torch.nn.functional.cosine_similarity. All arithmetic is fp32 whatever the storage type,
// and it is right at any finite magnitude: the norms and the dot product are accumulated unscaled and, only
// when a sum overflows, recomputed over the row divided by its largest magnitude (a robust norm's rescaling).
//
// Forward: per token the loss and, for the backward, three fp32 coefficients (inv_a, inv_t, c_a) with
//
//     inv_a = 1 / max(|a|, eps),  inv_t = 1 / max(|t|, eps),  c_a = [|a| > eps] * cos / |a|
//
// so that d loss / d a = inv_a * (c_a * a - inv_t * t) (below eps the clamped norm is a constant).
// Backward: grad[i] = grad_loss[i] * inv_a * (c_a * a - inv_t * t), written in the student's storage type and
// saturated to its finite range (a zero student row's gradient, ~1/eps, never becomes inf in fp16). The
// teacher receives no gradient. Each pass reads every student row and its teacher rows once.
//
// Everything here is torch-free: raw pointers, plus a cudaStream_t for the CUDA launchers.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/dtypes.h"

#ifdef UNIGENDET_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace unigendet {
namespace diga {

// Epsilon on each norm, as in torch.nn.functional.cosine_similarity.
constexpr float kEps = 1e-8f;

// Columns of the per-image table (one row of kTableCols int64 per image).
enum TableCol : int { kHs = 0, kWs, kHt, kWt, kStudentOffset, kTeacherOffset, kTableCols };

// Per-token coefficients saved by the forward for the backward: (inv_a, inv_t, c_a).
constexpr int kCoefCols = 3;

enum class DType { kFloat32, kFloat16, kBFloat16 };

// What both passes read: the rows and the image table.
struct Rows {
  const void* student = nullptr;  // (n_tokens, dim) rows of `student_stride` elements, storage `dtype`
  const void* teacher = nullptr;  // (n_teacher, dim) rows of `teacher_stride` elements
  const int64_t* table = nullptr;  // (n_images, kTableCols); a device pointer for the CUDA launchers
  int64_t n_images = 0;
  int64_t n_tokens = 0;  // student tokens (the sum of h_s * w_s)
  int64_t n_teacher = 0;  // teacher tokens (the sum of h_t * w_t)
  int64_t dim = 0;
  int64_t student_stride = 0;
  int64_t teacher_stride = 0;
};

struct FwdParams {
  Rows rows;
  float* loss = nullptr;  // (n_tokens,) fp32: 1 - cos
  float* coef = nullptr;  // (n_tokens, kCoefCols) fp32, or nullptr when no backward will follow
};

struct BwdParams {
  Rows rows;
  const float* coef = nullptr;  // (n_tokens, kCoefCols) from the forward
  const float* grad_loss = nullptr;  // d L / d loss_i at grad_loss[i * grad_loss_stride]
  int64_t grad_loss_stride = 1;  // 0: one value for every token (a reduction's scalar)
  void* grad = nullptr;  // (n_tokens, dim) contiguous, storage `dtype`
};

// Builds the per-image table from (h_s, w_s, h_t, w_t) rows and returns it; the totals of student and
// teacher tokens go to *n_student / *n_teacher. Throws std::invalid_argument on a non-positive size or on
// token counts that do not fit in int64 (the kernels' index arithmetic).
inline std::vector<int64_t> make_table(const int64_t* grids, int64_t n_images, int64_t* n_student,
                                       int64_t* n_teacher) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> table(static_cast<size_t>(n_images * kTableCols));
  int64_t s_off = 0, t_off = 0;
  for (int64_t b = 0; b < n_images; ++b) {
    const int64_t* g = grids + 4 * b;
    for (int k = 0; k < 4; ++k) {
      if (g[k] <= 0) {
        throw std::invalid_argument("grid sizes must be positive, image " + std::to_string(b) + " has " +
                                    std::to_string(g[k]));
      }
    }
    if (g[0] > kMax / g[1] || g[2] > kMax / g[3] || s_off > kMax - g[0] * g[1] || t_off > kMax - g[2] * g[3]) {
      throw std::invalid_argument("grid sizes overflow int64 at image " + std::to_string(b));
    }
    int64_t* row = table.data() + b * kTableCols;
    row[kHs] = g[0];
    row[kWs] = g[1];
    row[kHt] = g[2];
    row[kWt] = g[3];
    row[kStudentOffset] = s_off;
    row[kTeacherOffset] = t_off;
    s_off += g[0] * g[1];
    t_off += g[2] * g[3];
  }
  *n_student = s_off;
  *n_teacher = t_off;
  return table;
}

// Checks a host table against the token counts: positive sizes, consecutive offsets from 0, totals equal to
// n_tokens / n_teacher, no overflow. Returns an empty string when valid, else what is wrong.
inline std::string check_table(const int64_t* table, int64_t n_images, int64_t n_tokens, int64_t n_teacher) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t s_off = 0, t_off = 0;
  for (int64_t b = 0; b < n_images; ++b) {
    const int64_t* r = table + b * kTableCols;
    for (int k = 0; k < 4; ++k) {
      if (r[k] <= 0) return "image " + std::to_string(b) + " has a non-positive grid size " + std::to_string(r[k]);
    }
    if (r[kHs] > kMax / r[kWs] || r[kHt] > kMax / r[kWt]) return "grid sizes of image " + std::to_string(b) +
                                                                 " overflow int64";
    if (r[kStudentOffset] != s_off || r[kTeacherOffset] != t_off) {
      return "image " + std::to_string(b) + " offsets (" + std::to_string(r[kStudentOffset]) + ", " +
             std::to_string(r[kTeacherOffset]) + ") are not the running token counts (" + std::to_string(s_off) +
             ", " + std::to_string(t_off) + ")";
    }
    if (s_off > kMax - r[kHs] * r[kWs] || t_off > kMax - r[kHt] * r[kWt]) return "token counts overflow int64";
    s_off += r[kHs] * r[kWs];
    t_off += r[kHt] * r[kWt];
  }
  if (s_off != n_tokens) {
    return "student grids hold " + std::to_string(s_off) + " tokens, student has " + std::to_string(n_tokens);
  }
  if (t_off != n_teacher) {
    return "teacher grids hold " + std::to_string(t_off) + " tokens, teacher has " + std::to_string(n_teacher);
  }
  return "";
}

#if defined(__CUDACC__)
#define UNIGENDET_HD __host__ __device__ __forceinline__
#else
#define UNIGENDET_HD inline
#endif

// Source index and weights along one axis, exactly as ATen's upsample_bilinear2d computes them
// (area_pixel_compute_source_index in fp32, align_corners=False). Usable on host and device.
UNIGENDET_HD void source_index(int64_t in_size, int64_t out_size, int64_t dst, int64_t* i0, int64_t* i1,
                               float* lambda0, float* lambda1) {
  if (in_size == out_size) {
    *i0 = dst;
    *i1 = dst;
    *lambda0 = 1.0f;
    *lambda1 = 0.0f;
    return;
  }
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  src = src < 0.0f ? 0.0f : src;
  int64_t lo = static_cast<int64_t>(src);  // src >= 0, so truncation is floor
  lo = lo < in_size - 1 ? lo : in_size - 1;
  float l1 = src - static_cast<float>(lo);
  l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
  *i0 = lo;
  *i1 = lo + (lo < in_size - 1 ? 1 : 0);
  *lambda1 = l1;
  *lambda0 = 1.0f - l1;
}

// Whether the unscaled sums must be redone on the rescaled row: a sum overflowed although every input (and
// hence every rescaled term) is finite.
UNIGENDET_HD bool needs_rescale(float dot, float aa, float tt, float amax, float tmax) {
  const float big = 3.40282347e38f;  // the largest finite float: inf and NaN fail `<= big`
  return !(fabsf(dot) <= big && aa <= big && tt <= big) && amax <= big && tmax <= big;
}

// Scale of a row whose largest magnitude is m (finite): s = 2^e with m / s in [1, 2) (s = 1 when m == 0), and
// 1 / s as two factors r1 * r2, each a normal float, so that (x * r1) * r2 == x / s exactly.
UNIGENDET_HD void pow2_scale(float m, float* s, float* r1, float* r2) {
  const int e = m > 0.0f ? ilogbf(m) : 0;
  *s = ldexpf(1.0f, e);
  *r1 = ldexpf(1.0f, -(e / 2));
  *r2 = ldexpf(1.0f, -(e - e / 2));
}

// Loss and backward coefficients from the sums over the row divided by (sa, st) (1 when not rescaled):
// dot = sum (a/sa)(t/st), aa = |a/sa|^2, tt = |t/st|^2. The true norms sa*sqrt(aa) may exceed fp32's range,
// so only ratios are formed.
UNIGENDET_HD void finish(float dot, float aa, float tt, float sa, float st, float* loss, float* coef) {
  const float qa = sqrtf(aa), qt = sqrtf(tt);
  const bool a_big = qa > kEps / sa;  // |a| > eps
  const bool t_big = qt > kEps / st;
  const float ratio_a = a_big ? 1.0f / qa : sa / kEps;  // sa / max(|a|, eps)
  const float ratio_t = t_big ? 1.0f / qt : st / kEps;
  const float cos = dot * ratio_a * ratio_t;
  *loss = 1.0f - cos;
  if (coef != nullptr) {
    const float inv_a = a_big ? (1.0f / sa) / qa : 1.0f / kEps;
    const float inv_t = t_big ? (1.0f / st) / qt : 1.0f / kEps;
    coef[0] = inv_a;
    coef[1] = inv_t;
    coef[2] = a_big ? cos * inv_a : 0.0f;
  }
}

// The largest finite value of a storage type (gradients are clamped to it before the store).
template <typename T>
UNIGENDET_HD float max_finite();
template <>
UNIGENDET_HD float max_finite<float>() {
  return 3.40282347e38f;
}
template <>
UNIGENDET_HD float max_finite<Half>() {
  return 65504.0f;
}
template <>
UNIGENDET_HD float max_finite<BFloat16>() {
  return 3.38953139e38f;
}

UNIGENDET_HD float saturate(float v, float lim) {
  return v > lim ? lim : (v < -lim ? -lim : v);  // NaN passes through
}

// CPU kernels for the student tokens [begin, end); thread-safe for disjoint ranges. The table is a host table
// that check_table accepted.
void diga_loss_fwd_cpu(DType dtype, const FwdParams& p, int64_t begin, int64_t end);
void diga_loss_bwd_cpu(DType dtype, const BwdParams& p, int64_t begin, int64_t end);

// All tokens; OpenMP-parallel when compiled with OpenMP, else a plain loop.
void diga_loss_fwd_cpu(DType dtype, const FwdParams& p);
void diga_loss_bwd_cpu(DType dtype, const BwdParams& p);

#ifdef UNIGENDET_WITH_CUDA
// CUDA launchers: one warp per student token, asynchronous on `stream`, no host synchronisation. Every pointer
// in `p` (the table included) must be a device pointer. The table's values are not checked on the host (that
// would synchronise); a token whose table row would index outside the student or teacher rows gets a NaN loss
// (forward) or a NaN gradient row (backward) instead of an out-of-bounds read. Returns the launch status.
cudaError_t diga_loss_fwd_cuda(DType dtype, const FwdParams& p, cudaStream_t stream);
cudaError_t diga_loss_bwd_cuda(DType dtype, const BwdParams& p, cudaStream_t stream);
#endif

}  // namespace diga
}  // namespace unigendet
