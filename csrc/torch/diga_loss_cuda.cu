// CUDA implementation of unigendet::diga_loss_fwd (the schema is defined in diga_loss.cpp).
//
// Only device-generic c10 headers are used here (DeviceGuard and the device guard interface for the
// current stream), not c10/cuda or ATen/cuda: those need generated headers and cuBLAS/cuSPARSE headers
// that CPU builds of torch or minimal CUDA toolkits lack, and nothing more is needed to launch.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "torch/diga_loss_common.h"

namespace unigendet {
namespace diga_torch {
namespace {

std::tuple<at::Tensor, at::Tensor> diga_loss_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                      const at::Tensor& grids,
                                                      const c10::optional<at::Tensor>& weight, double grad_scale,
                                                      bool compute_grad) {
  TORCH_CHECK_VALUE(student.is_cuda(), "diga_loss_fwd (CUDA): student is on ", student.device());
  const c10::DeviceGuard guard(student.device());
  Prepared r = prepare(student, teacher, grids, weight, grad_scale, compute_grad);
  // The image table is tiny (6 int64 per image): copy it to the device in stream order.
  const at::Tensor table_cpu =
      at::from_blob(r.table.data(), {r.params.n_images, diga::kTableCols}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor table = table_cpu.to(r.student.device(), /*non_blocking=*/false, /*copy=*/true);
  r.params.table = table.data_ptr<int64_t>();
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(r.student.device());
  const cudaError_t err =
      diga::diga_loss_cuda(r.dtype, r.params, static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == cudaSuccess, "diga_loss_fwd (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return {r.loss, r.grad};
}

}  // namespace
}  // namespace diga_torch
}  // namespace unigendet

TORCH_LIBRARY_IMPL(unigendet, CUDA, m) { m.impl("diga_loss_fwd", &unigendet::diga_torch::diga_loss_fwd_cuda); }
