// CPU kernel of the fused DIGA loss (see diga_loss.h for the semantics).
//
// One student token at a time: pass 1 reads the student row and the (up to) four teacher rows it
// samples and accumulates a.t, |a|^2 and |t|^2; pass 2 re-reads the same rows, still in cache, and
// writes the gradient. The inner loops work on blocks of kLanes independent fp32 accumulators so that
// the compiler vectorises them at -O3 without -ffast-math (a single scalar accumulator would force
// sequential floating-point reduction order).
#include <algorithm>
#include <cmath>

#include "kernels/diga_loss.h"

namespace unigendet {
namespace diga {
namespace {

constexpr int kLanes = 16;

// The teacher value at one feature index: a single row (taps == 1, identical grids or an exact hit)
// or the bilinear blend of four rows, evaluated in ATen's order h0 * (w0 * a + w1 * b) + h1 * (...).
template <typename T, int kTaps>
struct Sampler {
  const T* r00;
  const T* r01;
  const T* r10;
  const T* r11;
  float h0, h1, w0, w1;

  inline float operator()(int64_t d) const {
    if (kTaps == 1) {
      return to_float(r00[d]);
    } else {
      return h0 * (w0 * to_float(r00[d]) + w1 * to_float(r01[d])) +
             h1 * (w0 * to_float(r10[d]) + w1 * to_float(r11[d]));
    }
  }
};

template <typename T, int kTaps>
void token_loss(const T* __restrict__ a, const Sampler<T, kTaps>& t, int64_t dim, float scale, float* loss,
                T* __restrict__ grad) {
  float acc_dot[kLanes] = {}, acc_aa[kLanes] = {}, acc_tt[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    float av[kLanes], tv[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      av[j] = to_float(a[d + j]);
      tv[j] = t(d + j);
    }
    for (int j = 0; j < kLanes; ++j) {
      acc_dot[j] += av[j] * tv[j];
      acc_aa[j] += av[j] * av[j];
      acc_tt[j] += tv[j] * tv[j];
    }
  }
  for (int j = 0; d < dim; ++d, ++j) {
    const float av = to_float(a[d]);
    const float tv = t(d);
    acc_dot[j] += av * tv;
    acc_aa[j] += av * av;
    acc_tt[j] += tv * tv;
  }
  float dot = 0.f, aa = 0.f, tt = 0.f;
  for (int j = 0; j < kLanes; ++j) {
    dot += acc_dot[j];
    aa += acc_aa[j];
    tt += acc_tt[j];
  }
  const float na = std::sqrt(aa), nt = std::sqrt(tt);
  const float ca = std::max(na, kEps), ct = std::max(nt, kEps);
  const float inv = 1.0f / (ca * ct);
  *loss = 1.0f - dot * inv;
  if (grad == nullptr) return;

  // d(1 - cos)/da = -(t - [|a| > eps] * (a.t / |a|^2) * a) / (max(|a|,eps) * max(|t|,eps));
  // below eps the student norm is a constant of the clamp and contributes no term.
  const float coef_t = -scale * inv;
  const float coef_a = na > kEps ? scale * inv * dot / aa : 0.0f;
  d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    float g[kLanes];
    for (int j = 0; j < kLanes; ++j) g[j] = coef_t * t(d + j) + coef_a * to_float(a[d + j]);
    for (int j = 0; j < kLanes; ++j) grad[d + j] = from_float<T>(g[j]);
  }
  for (; d < dim; ++d) grad[d] = from_float<T>(coef_t * t(d) + coef_a * to_float(a[d]));
}

template <typename T>
void run_range(const Params& p, int64_t begin, int64_t end) {
  if (begin >= end) return;
  const T* student = static_cast<const T*>(p.student);
  const T* teacher = static_cast<const T*>(p.teacher);
  T* grad = static_cast<T*>(p.grad);
  // The image holding token `begin`: the last one whose student offset is <= begin.
  int64_t lo = 0, hi = p.n_images - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.table[mid * kTableCols + kStudentOffset] <= begin) lo = mid; else hi = mid - 1;
  }
  int64_t b = lo;
  for (int64_t i = begin; i < end; ++i) {
    while (b + 1 < p.n_images && p.table[(b + 1) * kTableCols + kStudentOffset] <= i) ++b;
    const int64_t* row = p.table + b * kTableCols;
    const int64_t local = i - row[kStudentOffset];
    const int64_t y = local / row[kWs], x = local % row[kWs];
    int64_t y0, y1, x0, x1;
    float h0, h1, w0, w1;
    source_index(row[kHt], row[kHs], y, &y0, &y1, &h0, &h1);
    source_index(row[kWt], row[kWs], x, &x0, &x1, &w0, &w1);
    const T* tb = teacher + row[kTeacherOffset] * p.teacher_stride;
    const int64_t wt = row[kWt], ts = p.teacher_stride;
    const float scale = p.grad_scale * (p.weight != nullptr ? p.weight[i] : 1.0f);
    const T* a = student + i * p.student_stride;
    T* g = grad != nullptr ? grad + i * p.dim : nullptr;
    if (h1 == 0.0f && w1 == 0.0f) {
      Sampler<T, 1> s{tb + (y0 * wt + x0) * ts, nullptr, nullptr, nullptr, 1.f, 0.f, 1.f, 0.f};
      token_loss(a, s, p.dim, scale, p.loss + i, g);
    } else {
      Sampler<T, 4> s{tb + (y0 * wt + x0) * ts, tb + (y0 * wt + x1) * ts, tb + (y1 * wt + x0) * ts,
                      tb + (y1 * wt + x1) * ts, h0, h1, w0, w1};
      token_loss(a, s, p.dim, scale, p.loss + i, g);
    }
  }
}

}  // namespace

void diga_loss_cpu(DType dtype, const Params& p, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kFloat32:
      run_range<float>(p, begin, end);
      break;
    case DType::kFloat16:
      run_range<Half>(p, begin, end);
      break;
    case DType::kBFloat16:
      run_range<BFloat16>(p, begin, end);
      break;
  }
}

void diga_loss_cpu(DType dtype, const Params& p) {
#ifdef _OPENMP
  // Chunks of about 64k elements amortise the image lookup at the start of each range.
  const int64_t chunk = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.dim));
  const int64_t n_chunks = (p.n_tokens + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    diga_loss_cpu(dtype, p, c * chunk, std::min(p.n_tokens, (c + 1) * chunk));
  }
#else
  diga_loss_cpu(dtype, p, 0, p.n_tokens);
#endif
}

}  // namespace diga
}  // namespace unigendet
