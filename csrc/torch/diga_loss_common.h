// Argument checks and parameter setup shared by the CPU and CUDA registrations of unigendet::diga_loss_fwd and
// unigendet::diga_loss_bwd (schemas in diga_loss.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "kernels/diga_loss.h"

namespace unigendet {
namespace diga_torch {

inline diga::DType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return diga::DType::kFloat32;
    case at::kHalf:
      return diga::DType::kFloat16;
    case at::kBFloat16:
      return diga::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": student must be float32, float16 or bfloat16, got ", t);
  }
  return diga::DType::kFloat32;  // unreachable
}

// Validated inputs and the kernels' row description of one call. Rows may be strided; elements within a row
// must be contiguous (other layouts are made contiguous here).
struct Inputs {
  at::Tensor student, teacher, table;
  diga::Rows rows;
  diga::DType dtype;
};

// `table` is int64 (n_images, 6) on the student's device. On the CPU its values are checked here; on a GPU
// reading them would synchronise, so the CUDA kernels guard every index instead (see kernels/diga_loss.h).
inline Inputs prepare(const char* op, const at::Tensor& student_in, const at::Tensor& teacher_in,
                      const at::Tensor& table_in) {
  TORCH_CHECK_VALUE(student_in.dim() == 2, op, ": student must be 2-D (tokens, dim), got ", student_in.sizes());
  TORCH_CHECK_VALUE(teacher_in.dim() == 2, op, ": teacher must be 2-D (tokens, dim), got ", teacher_in.sizes());
  TORCH_CHECK_VALUE(teacher_in.size(1) == student_in.size(1), op, ": teacher feature size ", teacher_in.size(1),
                    " != student feature size ", student_in.size(1));
  TORCH_CHECK_VALUE(teacher_in.scalar_type() == student_in.scalar_type(), op, ": teacher dtype ",
                    teacher_in.scalar_type(), " != student dtype ", student_in.scalar_type());
  TORCH_CHECK_VALUE(teacher_in.device() == student_in.device(), op, ": teacher is on ", teacher_in.device(),
                    ", student on ", student_in.device());
  TORCH_CHECK_VALUE(table_in.scalar_type() == at::kLong && table_in.dim() == 2 &&
                        table_in.size(1) == diga::kTableCols,
                    op, ": table must be int64 of shape (n_images, ", static_cast<int>(diga::kTableCols), "), got ",
                    table_in.scalar_type(), " ", table_in.sizes());
  TORCH_CHECK_VALUE(table_in.device() == student_in.device(), op, ": table is on ", table_in.device(),
                    ", student on ", student_in.device());
  TORCH_CHECK_VALUE(table_in.size(0) > 0, op, ": table must describe at least one image");

  Inputs r;
  r.dtype = kernel_dtype(student_in.scalar_type(), op);
  r.student = student_in.stride(1) == 1 ? student_in : student_in.contiguous();
  r.teacher = teacher_in.stride(1) == 1 ? teacher_in : teacher_in.contiguous();
  r.table = table_in.contiguous();
  if (r.table.device().is_cpu()) {
    const std::string why = diga::check_table(r.table.data_ptr<int64_t>(), r.table.size(0), r.student.size(0),
                                              r.teacher.size(0));
    TORCH_CHECK_VALUE(why.empty(), op, ": table: ", why);
  }
  diga::Rows& p = r.rows;
  p.student = r.student.data_ptr();
  p.teacher = r.teacher.data_ptr();
  p.table = r.table.data_ptr<int64_t>();
  p.n_images = r.table.size(0);
  p.n_tokens = r.student.size(0);
  p.n_teacher = r.teacher.size(0);
  p.dim = r.student.size(1);
  p.student_stride = r.student.stride(0);
  p.teacher_stride = r.teacher.stride(0);
  return r;
}

// The coefficients of a forward and the incoming per-token gradient of a backward call.
inline void check_backward(const char* op, const Inputs& r, const at::Tensor& coef, const at::Tensor& grad_loss) {
  const int64_t n = r.rows.n_tokens;
  TORCH_CHECK_VALUE(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(0) == n &&
                        coef.size(1) == diga::kCoefCols && coef.is_contiguous(),
                    op, ": coef must be contiguous float32 of shape (", n, ", ", static_cast<int>(diga::kCoefCols),
                    ") from diga_loss_fwd, got ", coef.scalar_type(), " ", coef.sizes());
  TORCH_CHECK_VALUE(grad_loss.scalar_type() == at::kFloat &&
                        (grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == n)),
                    op, ": grad_loss must be float32 of shape () or (", n, ",), got ", grad_loss.scalar_type(), " ",
                    grad_loss.sizes());
  TORCH_CHECK_VALUE(coef.device() == r.student.device() && grad_loss.device() == r.student.device(), op,
                    ": coef and grad_loss must be on the student's device ", r.student.device());
}

// The outputs of a forward call and the kernel parameters pointing at them.
struct Forward {
  at::Tensor loss, coef;
  diga::FwdParams params;
};

inline Forward forward_outputs(const Inputs& r, bool save_coef) {
  const int64_t n = r.rows.n_tokens;
  Forward f;
  f.loss = at::empty({n}, r.student.options().dtype(at::kFloat));
  f.coef = at::empty({save_coef ? n : 0, diga::kCoefCols}, r.student.options().dtype(at::kFloat));
  f.params.rows = r.rows;
  f.params.loss = f.loss.data_ptr<float>();
  f.params.coef = save_coef ? f.coef.data_ptr<float>() : nullptr;
  return f;
}

// The gradient of a backward call and the kernel parameters (the incoming gradient made contiguous).
struct Backward {
  at::Tensor grad, grad_loss;
  diga::BwdParams params;
};

inline Backward backward_outputs(const Inputs& r, const at::Tensor& grad_loss, const at::Tensor& coef) {
  Backward b;
  b.grad_loss = grad_loss.contiguous();
  b.grad = at::empty({r.rows.n_tokens, r.rows.dim}, r.student.options());
  b.params.rows = r.rows;
  b.params.coef = coef.data_ptr<float>();
  b.params.grad_loss = b.grad_loss.data_ptr<float>();
  b.params.grad_loss_stride = b.grad_loss.dim() == 0 ? 0 : 1;
  b.params.grad = b.grad.numel() ? b.grad.data_ptr() : nullptr;
  return b;
}

}  // namespace diga_torch
}  // namespace unigendet
