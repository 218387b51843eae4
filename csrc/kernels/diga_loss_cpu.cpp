// CPU kernels of the fused DIGA loss (see diga_loss.h for the semantics).
//
// One student token at a time. The forward streams the student row and the (up to) four teacher rows it
// samples once, accumulating a.t, |a|^2, |t|^2 and the two largest magnitudes; only when a sum overflowed is
// the row read again, divided by its largest magnitude. The backward streams the same rows once and writes the
// gradient. The inner loops work on blocks of kLanes independent fp32 accumulators so that the compiler
// vectorises them at -O3 without -ffast-math (a single scalar accumulator would force a sequential order).
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

// Sums over one row of a and t (kScaled: of a * ra1 * ra2 and t * rt1 * rt2, power-of-two factors from
// pow2_scale, hence exact); also the largest magnitudes when `amax` is given.
template <bool kScaled, typename T, int kTaps>
void row_sums(const T* __restrict__ a, const Sampler<T, kTaps>& t, int64_t dim, const float (&r)[4], float* dot,
              float* aa, float* tt, float* amax, float* tmax) {
  float acc_dot[kLanes] = {}, acc_aa[kLanes] = {}, acc_tt[kLanes] = {}, acc_am[kLanes] = {}, acc_tm[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    float av[kLanes], tv[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      av[j] = kScaled ? to_float(a[d + j]) * r[0] * r[1] : to_float(a[d + j]);
      tv[j] = kScaled ? t(d + j) * r[2] * r[3] : t(d + j);
    }
    for (int j = 0; j < kLanes; ++j) {
      acc_dot[j] += av[j] * tv[j];
      acc_aa[j] += av[j] * av[j];
      acc_tt[j] += tv[j] * tv[j];
      acc_am[j] = std::max(acc_am[j], std::fabs(av[j]));
      acc_tm[j] = std::max(acc_tm[j], std::fabs(tv[j]));
    }
  }
  for (int j = 0; d < dim; ++d, ++j) {
    const float av = kScaled ? to_float(a[d]) * r[0] * r[1] : to_float(a[d]);
    const float tv = kScaled ? t(d) * r[2] * r[3] : t(d);
    acc_dot[j] += av * tv;
    acc_aa[j] += av * av;
    acc_tt[j] += tv * tv;
    acc_am[j] = std::max(acc_am[j], std::fabs(av));
    acc_tm[j] = std::max(acc_tm[j], std::fabs(tv));
  }
  float s_dot = 0.f, s_aa = 0.f, s_tt = 0.f, ma = 0.f, mt = 0.f;
  for (int j = 0; j < kLanes; ++j) {
    s_dot += acc_dot[j];
    s_aa += acc_aa[j];
    s_tt += acc_tt[j];
    ma = std::max(ma, acc_am[j]);
    mt = std::max(mt, acc_tm[j]);
  }
  *dot = s_dot;
  *aa = s_aa;
  *tt = s_tt;
  if (amax != nullptr) {
    *amax = ma;
    *tmax = mt;
  }
}

template <typename T, int kTaps>
void token_fwd(const T* __restrict__ a, const Sampler<T, kTaps>& t, int64_t dim, float* loss, float* coef) {
  float dot, aa, tt, amax, tmax;
  float r[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  row_sums<false>(a, t, dim, r, &dot, &aa, &tt, &amax, &tmax);
  float sa = 1.0f, st = 1.0f;
  if (needs_rescale(dot, aa, tt, amax, tmax)) {  // rare: huge features; rescale as a robust norm does
    pow2_scale(amax, &sa, &r[0], &r[1]);
    pow2_scale(tmax, &st, &r[2], &r[3]);
    row_sums<true>(a, t, dim, r, &dot, &aa, &tt, nullptr, nullptr);
  }
  finish(dot, aa, tt, sa, st, loss, coef);
}

template <typename T, int kTaps>
void token_bwd(const T* __restrict__ a, const Sampler<T, kTaps>& t, int64_t dim, const float* coef, float gl,
               T* __restrict__ grad) {
  // k * (c_a * a - inv_t * t): the bracket is O(1) at any magnitude of a and t (folding k into c_a and inv_t
  // first would make them subnormal for huge features).
  const float k = gl * coef[0], ca = coef[2], it = coef[1];
  const float lim = max_finite<T>();
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    float g[kLanes];
    for (int j = 0; j < kLanes; ++j) g[j] = saturate(k * (ca * to_float(a[d + j]) - it * t(d + j)), lim);
    for (int j = 0; j < kLanes; ++j) grad[d + j] = from_float<T>(g[j]);
  }
  for (; d < dim; ++d) grad[d] = from_float<T>(saturate(k * (ca * to_float(a[d]) - it * t(d)), lim));
}

// Calls fn(i, a_row, sampler) for every token of [begin, end), with the sampler of its teacher rows.
template <typename T, typename Fn>
void for_tokens(const Rows& p, int64_t begin, int64_t end, Fn&& fn) {
  if (begin >= end) return;
  const T* student = static_cast<const T*>(p.student);
  const T* teacher = static_cast<const T*>(p.teacher);
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
    const T* a = student + i * p.student_stride;
    if (h1 == 0.0f && w1 == 0.0f) {
      fn(i, a, Sampler<T, 1>{tb + (y0 * wt + x0) * ts, nullptr, nullptr, nullptr, 1.f, 0.f, 1.f, 0.f});
    } else {
      fn(i, a, Sampler<T, 4>{tb + (y0 * wt + x0) * ts, tb + (y0 * wt + x1) * ts, tb + (y1 * wt + x0) * ts,
                             tb + (y1 * wt + x1) * ts, h0, h1, w0, w1});
    }
  }
}

template <typename T>
void fwd_range(const FwdParams& p, int64_t begin, int64_t end) {
  for_tokens<T>(p.rows, begin, end, [&](int64_t i, const T* a, const auto& sampler) {
    token_fwd(a, sampler, p.rows.dim, p.loss + i, p.coef != nullptr ? p.coef + i * kCoefCols : nullptr);
  });
}

template <typename T>
void bwd_range(const BwdParams& p, int64_t begin, int64_t end) {
  T* grad = static_cast<T*>(p.grad);
  for_tokens<T>(p.rows, begin, end, [&](int64_t i, const T* a, const auto& sampler) {
    token_bwd(a, sampler, p.rows.dim, p.coef + i * kCoefCols, p.grad_loss[i * p.grad_loss_stride],
              grad + i * p.rows.dim);
  });
}

template <typename Range>
void parallel_tokens(int64_t n_tokens, int64_t dim, Range&& range) {
#ifdef _OPENMP
  // Chunks of about 64k elements amortise the image lookup at the start of each range.
  const int64_t chunk = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, dim));
  const int64_t n_chunks = (n_tokens + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) range(c * chunk, std::min(n_tokens, (c + 1) * chunk));
#else
  (void)dim;
  range(0, n_tokens);
#endif
}

}  // namespace

void diga_loss_fwd_cpu(DType dtype, const FwdParams& p, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kFloat32:
      fwd_range<float>(p, begin, end);
      break;
    case DType::kFloat16:
      fwd_range<Half>(p, begin, end);
      break;
    case DType::kBFloat16:
      fwd_range<BFloat16>(p, begin, end);
      break;
  }
}

void diga_loss_bwd_cpu(DType dtype, const BwdParams& p, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kFloat32:
      bwd_range<float>(p, begin, end);
      break;
    case DType::kFloat16:
      bwd_range<Half>(p, begin, end);
      break;
    case DType::kBFloat16:
      bwd_range<BFloat16>(p, begin, end);
      break;
  }
}

void diga_loss_fwd_cpu(DType dtype, const FwdParams& p) {
  parallel_tokens(p.rows.n_tokens, p.rows.dim, [&](int64_t b, int64_t e) { diga_loss_fwd_cpu(dtype, p, b, e); });
}

void diga_loss_bwd_cpu(DType dtype, const BwdParams& p) {
  parallel_tokens(p.rows.n_tokens, p.rows.dim, [&](int64_t b, int64_t e) { diga_loss_bwd_cpu(dtype, p, b, e); });
}

}  // namespace diga
}  // namespace unigendet
