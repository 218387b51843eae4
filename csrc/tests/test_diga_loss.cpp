// Compares the C++ DIGA loss kernel with a scalar double-precision reference on identical, upsampled,
// downsampled, non-square and 1xN grids, zero vectors, odd feature sizes, weights, and fp32 / fp16 /
// bf16 storage. Exits non-zero on the first failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/diga_loss.h"

using unigendet::BFloat16;
using unigendet::Half;
using unigendet::from_float;
using unigendet::to_float;
namespace diga = unigendet::diga;

namespace {

int g_failures = 0;

struct Grid {
  int64_t hs, ws, ht, wt;
};

// Reference source index in double precision (the same rule as F.interpolate, align_corners=False).
void ref_index(int64_t in, int64_t out, int64_t dst, int64_t* i0, int64_t* i1, double* l1) {
  if (in == out) {
    *i0 = *i1 = dst;
    *l1 = 0.0;
    return;
  }
  double src = (dst + 0.5) * static_cast<double>(in) / static_cast<double>(out) - 0.5;
  src = std::max(src, 0.0);
  *i0 = std::min<int64_t>(static_cast<int64_t>(std::floor(src)), in - 1);
  *i1 = std::min<int64_t>(*i0 + 1, in - 1);
  *l1 = std::min(std::max(src - *i0, 0.0), 1.0);
}

// Double reference: per-token loss and d(sum_i scale_i * loss_i)/d student.
void reference(const std::vector<Grid>& grids, const std::vector<double>& s, const std::vector<double>& t,
               int64_t dim, const std::vector<double>& scale, std::vector<double>* loss,
               std::vector<double>* grad) {
  int64_t so = 0, to = 0;
  for (const Grid& g : grids) {
    for (int64_t y = 0; y < g.hs; ++y) {
      for (int64_t x = 0; x < g.ws; ++x) {
        int64_t y0, y1, x0, x1;
        double ly, lx;
        ref_index(g.ht, g.hs, y, &y0, &y1, &ly);
        ref_index(g.wt, g.ws, x, &x0, &x1, &lx);
        const int64_t i = so + y * g.ws + x;
        std::vector<double> tv(dim);
        double dot = 0, aa = 0, tt = 0;
        for (int64_t d = 0; d < dim; ++d) {
          auto T = [&](int64_t yy, int64_t xx) { return t[(to + yy * g.wt + xx) * dim + d]; };
          tv[d] = (1 - ly) * ((1 - lx) * T(y0, x0) + lx * T(y0, x1)) + ly * ((1 - lx) * T(y1, x0) + lx * T(y1, x1));
          const double a = s[i * dim + d];
          dot += a * tv[d];
          aa += a * a;
          tt += tv[d] * tv[d];
        }
        const double na = std::sqrt(aa), nt = std::sqrt(tt), eps = 1e-8;
        const double ca = std::max(na, eps), ct = std::max(nt, eps);
        (*loss)[i] = 1.0 - dot / (ca * ct);
        for (int64_t d = 0; d < dim; ++d) {
          const double da = tv[d] / (ca * ct) - (na > eps ? dot / (na * na * na * ct) * s[i * dim + d] : 0.0);
          (*grad)[i * dim + d] = -scale[i] * da;
        }
      }
    }
    so += g.hs * g.ws;
    to += g.ht * g.wt;
  }
}

template <typename T>
diga::DType dtype_of();
template <>
diga::DType dtype_of<float>() { return diga::DType::kFloat32; }
template <>
diga::DType dtype_of<Half>() { return diga::DType::kFloat16; }
template <>
diga::DType dtype_of<BFloat16>() { return diga::DType::kBFloat16; }

template <typename T>
double unit_roundoff();
template <>
double unit_roundoff<float>() { return std::ldexp(1.0, -24); }
template <>
double unit_roundoff<Half>() { return std::ldexp(1.0, -11); }
template <>
double unit_roundoff<BFloat16>() { return std::ldexp(1.0, -8); }

template <typename T>
const char* name_of() {
  return dtype_of<T>() == diga::DType::kFloat32 ? "fp32" : dtype_of<T>() == diga::DType::kFloat16 ? "fp16" : "bf16";
}

template <typename T>
double max_finite_of() {
  return dtype_of<T>() == diga::DType::kFloat16 ? 65504.0 : 3.4028234663852886e38;
}

// `magnitude` scales every input (1e20 exercises the rescaled path: the squares overflow fp32).
template <typename T>
void run_case(const char* label, const std::vector<Grid>& grids, int64_t dim, bool weighted, bool zero_rows,
              uint32_t seed, float magnitude = 1.0f) {
  int64_t n_s = 0, n_t = 0;
  std::vector<int64_t> raw;
  for (const Grid& g : grids) raw.insert(raw.end(), {g.hs, g.ws, g.ht, g.wt});
  const std::vector<int64_t> table = diga::make_table(raw.data(), static_cast<int64_t>(grids.size()), &n_s, &n_t);
  if (!diga::check_table(table.data(), static_cast<int64_t>(grids.size()), n_s, n_t).empty()) {
    std::printf("check_table rejected a table from make_table\n");
    ++g_failures;
  }

  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.1f, 2.f);
  std::vector<T> s(n_s * dim), t(n_t * dim);
  std::vector<double> sd(s.size()), td(t.size());
  for (size_t k = 0; k < s.size(); ++k) {
    s[k] = from_float<T>(normal(rng) * magnitude);
    sd[k] = to_float(s[k]);  // the reference sees exactly the stored values
  }
  for (size_t k = 0; k < t.size(); ++k) {
    t[k] = from_float<T>(normal(rng) * magnitude);
    td[k] = to_float(t[k]);
  }
  if (zero_rows) {
    // A zero student row (the gradient is then t/(eps*|t|)) and a zero teacher row.
    for (int64_t d = 0; d < dim; ++d) {
      s[d] = from_float<T>(0.f);
      sd[d] = 0.0;
      t[(n_t - 1) * dim + d] = from_float<T>(0.f);
      td[(n_t - 1) * dim + d] = 0.0;
    }
  }
  // The per-token incoming gradient: a reduction's scale times the weights.
  std::vector<float> gl(n_s);
  std::vector<double> scale(n_s);
  for (int64_t i = 0; i < n_s; ++i) {
    gl[i] = 0.5f * (weighted ? uniform(rng) : 1.f);
    scale[i] = gl[i];
  }

  diga::Rows rows;
  rows.student = s.data();
  rows.teacher = t.data();
  rows.table = table.data();
  rows.n_images = static_cast<int64_t>(grids.size());
  rows.n_tokens = n_s;
  rows.n_teacher = n_t;
  rows.dim = dim;
  rows.student_stride = dim;
  rows.teacher_stride = dim;
  std::vector<float> loss(n_s, -1.f), loss_nocoef(n_s, -1.f), coef(n_s * diga::kCoefCols);
  diga::FwdParams f;
  f.rows = rows;
  f.loss = loss.data();
  f.coef = coef.data();
  diga::diga_loss_fwd_cpu(dtype_of<T>(), f);
  f.loss = loss_nocoef.data();
  f.coef = nullptr;
  diga::diga_loss_fwd_cpu(dtype_of<T>(), f, 0, n_s);
  std::vector<T> grad(n_s * dim);
  diga::BwdParams b;
  b.rows = rows;
  b.coef = coef.data();
  b.grad_loss = gl.data();
  b.grad_loss_stride = 1;
  b.grad = grad.data();
  diga::diga_loss_bwd_cpu(dtype_of<T>(), b);

  std::vector<double> rl(n_s), rg(n_s * dim);
  reference(grids, sd, td, dim, scale, &rl, &rg);

  // Loss: fp32 accumulation over dim terms; gradient: fp32 math plus one rounding to T, saturated to T's range.
  double max_l = 0, max_g = 0, gmax = 0;
  bool same_without_coef = true;
  for (int64_t i = 0; i < n_s; ++i) {
    max_l = std::max(max_l, std::fabs(loss[i] - rl[i]));
    same_without_coef = same_without_coef && loss[i] == loss_nocoef[i];
  }
  // Gradient errors are measured relative to the largest entry of their own row, so that the huge
  // gradient of a zero student row does not loosen the check of the others.
  const double lim = max_finite_of<T>();
  double max_g_rel = 0;
  bool finite = true;
  for (int64_t i = 0; i < n_s; ++i) {
    double row_err = 0, row_max = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double r = std::max(-lim, std::min(lim, rg[i * dim + d]));
      const double got = to_float(grad[i * dim + d]);
      finite = finite && std::isfinite(got);
      row_err = std::max(row_err, std::fabs(got - r));
      row_max = std::max(row_max, std::fabs(r));
    }
    max_g = std::max(max_g, row_err);
    gmax = std::max(gmax, row_max);
    max_g_rel = std::max(max_g_rel, row_err / std::max(row_max, 1e-300));
  }
  const double tol_l = 16 * std::ldexp(1.0, -24) * std::sqrt(static_cast<double>(dim)) + 1e-6;
  const double tol_g_rel = 2 * unit_roundoff<T>() + 1e-5;
  const double tol_g = tol_g_rel * gmax;
  const bool ok = max_l <= tol_l && max_g_rel <= tol_g_rel && same_without_coef && finite;
  std::printf("%-4s %-28s dim=%-4lld tokens=%-4lld loss err %.2e (tol %.1e) grad err %.2e (tol %.1e)%s%s %s\n",
              name_of<T>(), label, static_cast<long long>(dim), static_cast<long long>(n_s), max_l, tol_l, max_g,
              tol_g, same_without_coef ? "" : " [loss differs without coef]", finite ? "" : " [non-finite grad]",
              ok ? "ok" : "FAILED");
  if (!ok) ++g_failures;
}

template <typename T>
void run_all() {
  run_case<T>("equal grids", {{4, 4, 4, 4}, {3, 5, 3, 5}}, 67, false, false, 1);
  run_case<T>("upsample", {{8, 8, 3, 3}}, 64, false, false, 2);
  run_case<T>("downsample", {{3, 3, 7, 7}}, 48, true, false, 3);
  run_case<T>("non-square mixed batch", {{5, 7, 4, 9}, {2, 6, 5, 3}, {6, 4, 6, 4}}, 33, true, false, 4);
  run_case<T>("1xN and Nx1", {{1, 9, 1, 4}, {7, 1, 3, 1}, {1, 1, 2, 2}}, 20, false, false, 5);
  run_case<T>("odd dim", {{3, 4, 5, 2}}, 3, false, false, 6);
  run_case<T>("long rows", {{2, 3, 3, 2}}, 3584, false, false, 7);
}

void test_conversions() {
  // Every finite binary16 value survives a round trip; a few known bfloat16 roundings.
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const Half h{static_cast<uint16_t>(bits)};
    const float f = to_float(h);
    if (std::isnan(f)) {
      if ((bits & 0x7c00u) != 0x7c00u || (bits & 0x3ffu) == 0) ++g_failures;
      continue;
    }
    if (from_float<Half>(f).bits != bits) {
      std::printf("half round trip failed for 0x%04x\n", bits);
      ++g_failures;
      return;
    }
  }
  if (to_float(Half{0x3c00}) != 1.0f || to_float(Half{0x0001}) != std::ldexp(1.0f, -24) ||
      from_float<Half>(65520.f).bits != 0x7c00 || from_float<Half>(1.0f + std::ldexp(1.0f, -11)).bits != 0x3c00) {
    std::printf("half conversion spot checks failed\n");
    ++g_failures;
  }
  if (from_float<BFloat16>(1.0f + std::ldexp(1.0f, -8)).bits != 0x3f80 ||
      from_float<BFloat16>(1.0f + 3 * std::ldexp(1.0f, -8)).bits != 0x3f82 || to_float(BFloat16{0x3f80}) != 1.0f ||
      !std::isnan(to_float(from_float<BFloat16>(std::nanf(""))))) {
    std::printf("bfloat16 conversion spot checks failed\n");
    ++g_failures;
  }
}

}  // namespace

int main() {
  test_conversions();
  run_all<float>();
  run_all<Half>();
  run_all<BFloat16>();
  run_case<float>("zero vectors", {{3, 3, 2, 2}}, 16, false, true, 8);
  run_case<BFloat16>("zero vectors", {{3, 3, 2, 2}}, 16, true, true, 9);
  run_case<Half>("zero vectors (saturated grad)", {{3, 3, 2, 2}}, 16, true, true, 10);
  run_case<float>("|x| ~ 1e20 (rescaled sums)", {{4, 4, 3, 3}}, 64, true, false, 11, 1e20f);
  run_case<BFloat16>("|x| ~ 1e20 (rescaled sums)", {{4, 4, 3, 3}}, 64, false, false, 12, 1e20f);
  run_case<float>("|x| ~ 1e-20", {{4, 4, 3, 3}}, 64, false, false, 13, 1e-20f);
  bool threw = false;
  try {
    const int64_t bad[4] = {2, 0, 2, 2};
    int64_t a, b;
    diga::make_table(bad, 1, &a, &b);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  if (!threw) {
    std::printf("make_table accepted a zero grid size\n");
    ++g_failures;
  }
  threw = false;
  try {
    const int64_t huge[4] = {int64_t(1) << 40, int64_t(1) << 40, 1, 1};
    int64_t a, b;
    diga::make_table(huge, 1, &a, &b);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  if (!threw) {
    std::printf("make_table accepted a grid whose size overflows int64\n");
    ++g_failures;
  }
  {
    const int64_t grid[4] = {2, 2, 2, 2};
    int64_t a, b;
    std::vector<int64_t> tab = diga::make_table(grid, 1, &a, &b);
    if (diga::check_table(tab.data(), 1, 5, 4).empty() || diga::check_table(tab.data(), 1, 4, 3).empty()) {
      std::printf("check_table accepted wrong token counts\n");
      ++g_failures;
    }
    tab[diga::kTeacherOffset] = 1;
    if (diga::check_table(tab.data(), 1, 4, 4).empty()) {
      std::printf("check_table accepted a wrong offset\n");
      ++g_failures;
    }
  }
  if (g_failures != 0) {
    std::printf("%d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("all DIGA loss kernel checks passed\n");
  return 0;
}
