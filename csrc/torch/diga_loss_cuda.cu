// CUDA implementations of unigendet::diga_loss_fwd / diga_loss_bwd (the schemas are defined in diga_loss.cpp).
//
// Every input, the image table included, is already on the device: nothing is copied from the host and nothing
// synchronises with it, so both ops can be captured in a CUDA graph.
//
// Only device-generic c10 headers are used here (DeviceGuard and the device guard interface for the current
// stream), not c10/cuda or ATen/cuda: those need generated headers and cuBLAS/cuSPARSE headers that CPU builds of
// torch or minimal CUDA toolkits lack, and nothing more is needed to launch.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "torch/diga_loss_common.h"

namespace unigendet {
namespace diga_torch {
namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(stream.native_handle());
}

std::tuple<at::Tensor, at::Tensor> diga_loss_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                      const at::Tensor& table, bool save_coef) {
  const char* op = "diga_loss_fwd";
  TORCH_CHECK_VALUE(student.is_cuda(), op, " (CUDA): student is on ", student.device());
  const c10::DeviceGuard guard(student.device());
  const Inputs r = prepare(op, student, teacher, table);
  Forward f = forward_outputs(r, save_coef);
  const cudaError_t err = diga::diga_loss_fwd_cuda(r.dtype, f.params, current_stream(r.student));
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return {f.loss, f.coef};
}

at::Tensor diga_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& table, const at::Tensor& coef) {
  const char* op = "diga_loss_bwd";
  TORCH_CHECK_VALUE(student.is_cuda(), op, " (CUDA): student is on ", student.device());
  const c10::DeviceGuard guard(student.device());
  const Inputs r = prepare(op, student, teacher, table);
  check_backward(op, r, coef, grad_loss);
  Backward b = backward_outputs(r, grad_loss, coef);
  if (b.grad.numel() == 0) return b.grad;
  const cudaError_t err = diga::diga_loss_bwd_cuda(r.dtype, b.params, current_stream(r.student));
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return b.grad;
}

}  // namespace
}  // namespace diga_torch
}  // namespace unigendet

TORCH_LIBRARY_IMPL(unigendet, CUDA, m) {
  m.impl("diga_loss_fwd", &unigendet::diga_torch::diga_loss_fwd_cuda);
  m.impl("diga_loss_bwd", &unigendet::diga_torch::diga_loss_bwd_cuda);
}
