// Registration of unigendet::diga_loss_fwd / diga_loss_bwd and their CPU implementations
// (see kernels/diga_loss.h).
//
//   diga_loss_fwd(student (N, D), teacher (M, D), table int64 (B, 6) on the student's device, save_coef)
//     -> (loss (N,) float32 = 1 - cos per student token,
//         coef (N, 3) float32 = (inv_a, inv_t, c_a) for the backward, or (0, 3) without save_coef)
//   diga_loss_bwd(grad_loss float32 () or (N,), student, teacher, table, coef)
//     -> grad (N, D) in the student dtype = grad_loss * d loss / d student
//
// The table rows are (h_s, w_s, h_t, w_t, student offset, teacher offset) per image (unigendet.ops.diga_loss
// builds them from the grid lists).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "torch/diga_loss_common.h"

namespace unigendet {
namespace diga_torch {
namespace {

int64_t grain(int64_t dim) {
  // Roughly 32k elements per task, so that small batches stay on one thread.
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, dim));
}

std::tuple<at::Tensor, at::Tensor> diga_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     const at::Tensor& table, bool save_coef) {
  const char* op = "diga_loss_fwd";
  TORCH_CHECK_VALUE(student.device().is_cpu(), op, " (CPU): student is on ", student.device());
  const Inputs r = prepare(op, student, teacher, table);
  Forward f = forward_outputs(r, save_coef);
  at::parallel_for(0, r.rows.n_tokens, grain(r.rows.dim),
                   [&](int64_t begin, int64_t end) { diga::diga_loss_fwd_cpu(r.dtype, f.params, begin, end); });
  return {f.loss, f.coef};
}

at::Tensor diga_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& table, const at::Tensor& coef) {
  const char* op = "diga_loss_bwd";
  TORCH_CHECK_VALUE(student.device().is_cpu(), op, " (CPU): student is on ", student.device());
  const Inputs r = prepare(op, student, teacher, table);
  check_backward(op, r, coef, grad_loss);
  Backward b = backward_outputs(r, grad_loss, coef);
  if (b.grad.numel() == 0) return b.grad;
  at::parallel_for(0, r.rows.n_tokens, grain(r.rows.dim),
                   [&](int64_t begin, int64_t end) { diga::diga_loss_bwd_cpu(r.dtype, b.params, begin, end); });
  return b.grad;
}

}  // namespace
}  // namespace diga_torch
}  // namespace unigendet

TORCH_LIBRARY_FRAGMENT(unigendet, m) {
  m.def("diga_loss_fwd(Tensor student, Tensor teacher, Tensor table, bool save_coef) -> (Tensor, Tensor)");
  m.def("diga_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor table, Tensor coef) -> Tensor");
}

TORCH_LIBRARY_IMPL(unigendet, CPU, m) {
  m.impl("diga_loss_fwd", &unigendet::diga_torch::diga_loss_fwd_cpu);
  m.impl("diga_loss_bwd", &unigendet::diga_torch::diga_loss_bwd_cpu);
}
