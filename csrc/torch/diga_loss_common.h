// Argument checks and parameter setup shared by the CPU and CUDA registrations of
// unigendet::diga_loss_fwd.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <stdexcept>
#include <vector>

#include "kernels/diga_loss.h"

namespace unigendet {
namespace diga_torch {

inline diga::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return diga::DType::kFloat32;
    case at::kHalf:
      return diga::DType::kFloat16;
    case at::kBFloat16:
      return diga::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "diga_loss_fwd: student must be float32, float16 or bfloat16, got ", t);
  }
  return diga::DType::kFloat32;  // unreachable
}

// Validated inputs, outputs and kernel parameters of one call. The image table is on the CPU; the CUDA
// registration copies it to the device and repoints params.table.
struct Prepared {
  at::Tensor student, teacher, weight, loss, grad;
  std::vector<int64_t> table;
  diga::Params params;
  diga::DType dtype;
};

inline Prepared prepare(const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& grids_in,
                        const c10::optional<at::Tensor>& weight_in, double grad_scale, bool compute_grad) {
  TORCH_CHECK_VALUE(student_in.dim() == 2, "diga_loss_fwd: student must be 2-D (tokens, dim), got ",
                    student_in.sizes());
  TORCH_CHECK_VALUE(teacher_in.dim() == 2, "diga_loss_fwd: teacher must be 2-D (tokens, dim), got ",
                    teacher_in.sizes());
  TORCH_CHECK_VALUE(teacher_in.size(1) == student_in.size(1), "diga_loss_fwd: teacher feature size ",
                    teacher_in.size(1), " != student feature size ", student_in.size(1));
  TORCH_CHECK_VALUE(teacher_in.scalar_type() == student_in.scalar_type(), "diga_loss_fwd: teacher dtype ",
                    teacher_in.scalar_type(), " != student dtype ", student_in.scalar_type());
  TORCH_CHECK_VALUE(teacher_in.device() == student_in.device(), "diga_loss_fwd: teacher is on ",
                    teacher_in.device(), ", student on ", student_in.device());
  TORCH_CHECK_VALUE(grids_in.device().is_cpu(), "diga_loss_fwd: grids must be a CPU tensor");
  TORCH_CHECK_VALUE(grids_in.scalar_type() == at::kLong && grids_in.dim() == 2 && grids_in.size(1) == 4,
                    "diga_loss_fwd: grids must be int64 of shape (n_images, 4), got ", grids_in.scalar_type(), " ",
                    grids_in.sizes());
  TORCH_CHECK_VALUE(grids_in.size(0) > 0, "diga_loss_fwd: grids must describe at least one image");

  Prepared r;
  r.dtype = kernel_dtype(student_in.scalar_type());
  const at::Tensor grids = grids_in.contiguous();
  int64_t n_student = 0, n_teacher = 0;
  try {
    r.table = diga::make_table(grids.data_ptr<int64_t>(), grids.size(0), &n_student, &n_teacher);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "diga_loss_fwd: ", e.what());
  }
  TORCH_CHECK_VALUE(n_student == student_in.size(0), "diga_loss_fwd: student grids hold ", n_student,
                    " tokens, student has ", student_in.size(0));
  TORCH_CHECK_VALUE(n_teacher == teacher_in.size(0), "diga_loss_fwd: teacher grids hold ", n_teacher,
                    " tokens, teacher has ", teacher_in.size(0));

  // Rows may be strided; elements within a row must be contiguous.
  r.student = student_in.stride(1) == 1 ? student_in : student_in.contiguous();
  r.teacher = teacher_in.stride(1) == 1 ? teacher_in : teacher_in.contiguous();
  const int64_t n = r.student.size(0), dim = r.student.size(1);
  if (weight_in.has_value()) {
    const at::Tensor& w = *weight_in;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == n, "diga_loss_fwd: weight must have shape (", n, ",), got ",
                      w.sizes());
    TORCH_CHECK_VALUE(w.device() == r.student.device(), "diga_loss_fwd: weight is on ", w.device(),
                      ", student on ", r.student.device());
    TORCH_CHECK_VALUE(at::isFloatingType(w.scalar_type()), "diga_loss_fwd: weight must be floating point, got ",
                      w.scalar_type());
    r.weight = w.to(at::kFloat).contiguous();
  }
  r.loss = at::empty({n}, r.student.options().dtype(at::kFloat));
  r.grad = compute_grad ? at::empty({n, dim}, r.student.options()) : at::empty({0, dim}, r.student.options());

  diga::Params& p = r.params;
  p.student = r.student.data_ptr();
  p.teacher = r.teacher.data_ptr();
  p.table = r.table.data();
  p.weight = r.weight.defined() ? r.weight.data_ptr<float>() : nullptr;
  p.grad_scale = static_cast<float>(grad_scale);
  p.n_images = grids.size(0);
  p.n_tokens = n;
  p.dim = dim;
  p.student_stride = r.student.stride(0);
  p.teacher_stride = r.teacher.stride(0);
  p.loss = r.loss.data_ptr<float>();
  p.grad = compute_grad && n > 0 && dim > 0 ? r.grad.data_ptr() : nullptr;
  return r;
}

}  // namespace diga_torch
}  // namespace unigendet
