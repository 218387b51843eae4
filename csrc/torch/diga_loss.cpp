// Registration of unigendet::diga_loss_fwd and its CPU implementation (see kernels/diga_loss.h).
//
//   diga_loss_fwd(student (N, D), teacher (M, D), grids int64 (B, 4) = (h_s, w_s, h_t, w_t) on the CPU,
//                 weight (N,)?, grad_scale, compute_grad)
//     -> (loss (N,) float32 = 1 - cos per student token, unweighted,
//         grad (N, D) in the student dtype = grad_scale * weight * d loss / d student, or (0, D))
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "torch/diga_loss_common.h"

namespace unigendet {
namespace diga_torch {
namespace {

std::tuple<at::Tensor, at::Tensor> diga_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     const at::Tensor& grids, const c10::optional<at::Tensor>& weight,
                                                     double grad_scale, bool compute_grad) {
  TORCH_CHECK_VALUE(student.device().is_cpu(), "diga_loss_fwd (CPU): student is on ", student.device());
  Prepared r = prepare(student, teacher, grids, weight, grad_scale, compute_grad);
  const diga::Params& p = r.params;
  // Grain of roughly 32k elements per task, so that small batches stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.dim));
  at::parallel_for(0, p.n_tokens, grain,
                   [&](int64_t begin, int64_t end) { diga::diga_loss_cpu(r.dtype, p, begin, end); });
  return {r.loss, r.grad};
}

}  // namespace
}  // namespace diga_torch
}  // namespace unigendet

TORCH_LIBRARY_FRAGMENT(unigendet, m) {
  m.def(
      "diga_loss_fwd(Tensor student, Tensor teacher, Tensor grids, Tensor? weight, float grad_scale, "
      "bool compute_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unigendet, CPU, m) { m.impl("diga_loss_fwd", &unigendet::diga_torch::diga_loss_fwd_cpu); }
