// The NCCL implementation of Communicator: device buffers move over NCCL; host() is the MPI communicator
// it wraps, for the host values the runtime also exchanges over the same group (counts, loss sums,
// configuration strings).
//
// Device collectives are stream-ordered and never block the host: each runs on the communicator's own
// stream after the work already issued on the compute stream, and the compute stream waits for it
// (all_reduce_sum_start leaves that last wait to wait_pending()). A dead or stuck peer surfaces as a
// CommError through the device-wait poller (runtime/device_wait.h) once runtime.comm_timeout_s passes.
//
// Single-GPU test mode: several ranks can share one GPU only when each rank sets its own NCCL_HOSTID
// and every rank sets NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1; NCCL then treats the ranks as separate
// hosts and they talk over sockets. That is an environment setting for tests, not a code path here.
//
// This header includes no CUDA, NCCL or MPI header: streams are passed as void*.
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace moe {

// Makes a Communicator over the same ranks as `host` (an MPI communicator of the group) that moves
// device buffers with NCCL and host buffers with `host`. Collective over `host`. The caller has already
// selected this rank's device (cudaSetDevice). `compute_stream` is the cudaStream_t the op backend issues
// its kernels on; device collectives are ordered against it. `timeout_s` (runtime.comm_timeout_s; <= 0
// disables it) bounds how long the host may wait on a collective before the communicator is aborted and
// a CommError is thrown.
std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host, void* compute_stream,
                                                     double timeout_s);

}  // namespace moe
