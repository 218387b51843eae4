// Fused DIGA alignment loss: 1 - cos(student, bilinear(teacher)) per student token, with the
// student gradient computed in the same pass.
//
// A packed batch holds several images. Image b has h_s x w_s student tokens and h_t x w_t teacher
// tokens, both row-major, and the images are concatenated along the token axis. Each student token
// samples the teacher grid bilinearly at its own position with the align_corners=False rule of
// torch.nn.functional.interpolate(mode="bilinear"):
//
//     src = max((dst + 0.5) * in / out - 0.5, 0),  i0 = min(floor(src), in - 1),
//     i1 = min(i0 + 1, in - 1),  lambda1 = src - i0,  lambda0 = 1 - lambda1
//
// (equal sizes copy), and the loss is 1 - a.t / (max(|a|, eps) * max(|t|, eps)) with eps = 1e-8,
// the convention of torch.nn.functional.cosine_similarity. All arithmetic is fp32 whatever the
// storage type. The teacher receives no gradient. When a gradient buffer is given, the kernels write
//
//     grad[i] = grad_scale * weight[i] * d loss_i / d student_i
//
// (weight[i] = 1 without weights) in the student's storage type; a caller's backward only has to scale
// it by the incoming gradient.
//
// Everything here is torch-free: raw pointers, plus a cudaStream_t for the CUDA launcher.
#pragma once

#include <cstdint>
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

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct Params {
  const void* student = nullptr;  // (n_tokens, dim) rows of `student_stride` elements, storage `dtype`
  const void* teacher = nullptr;  // (n_teacher_tokens, dim) rows of `teacher_stride` elements
  const int64_t* table = nullptr;  // (n_images, kTableCols); a device pointer for the CUDA launcher
  const float* weight = nullptr;  // (n_tokens,) per-token gradient weights, or nullptr for all ones
  float grad_scale = 1.0f;  // multiplies every gradient row
  int64_t n_images = 0;
  int64_t n_tokens = 0;  // student tokens (the sum of h_s * w_s)
  int64_t dim = 0;
  int64_t student_stride = 0;
  int64_t teacher_stride = 0;
  float* loss = nullptr;  // (n_tokens,) fp32: 1 - cos, unweighted
  void* grad = nullptr;  // (n_tokens, dim) contiguous, storage `dtype`; nullptr: no gradient
};

// Builds the per-image table from (h_s, w_s, h_t, w_t) rows and returns it; the totals of student and
// teacher tokens go to *n_student / *n_teacher. Throws std::invalid_argument on a non-positive size.
inline std::vector<int64_t> make_table(const int64_t* grids, int64_t n_images, int64_t* n_student,
                                       int64_t* n_teacher) {
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

// Source index and weights along one axis, exactly as ATen's upsample_bilinear2d computes them
// (area_pixel_compute_source_index in fp32, align_corners=False). Usable on host and device.
#if defined(__CUDACC__)
#define UNIGENDET_HD __host__ __device__ __forceinline__
#else
#define UNIGENDET_HD inline
#endif

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

// CPU kernel for the student tokens [begin, end); thread-safe for disjoint ranges.
void diga_loss_cpu(DType dtype, const Params& p, int64_t begin, int64_t end);

// All tokens; OpenMP-parallel when compiled with OpenMP, else a plain loop.
void diga_loss_cpu(DType dtype, const Params& p);

#ifdef UNIGENDET_WITH_CUDA
// CUDA launcher: one warp per student token, asynchronous on `stream`. All pointers in `p` (the table
// included) must be device pointers. Returns the launch status.
cudaError_t diga_loss_cuda(DType dtype, const Params& p, cudaStream_t stream);
#endif

}  // namespace diga
}  // namespace unigendet
