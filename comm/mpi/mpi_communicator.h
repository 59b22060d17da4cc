// The MPI implementation of Communicator (host buffers), and the process-level MPI calls main() needs.
//
// This header does not include mpi.h, so code above comm/ never sees MPI types.
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace moe {

// MPI_Init_thread once per process; later calls do nothing.
void mpi_init(int* argc, char*** argv);
void mpi_finalize();
// Kills every rank of the job (MPI_Abort on MPI_COMM_WORLD). Safe to call before mpi_init.
[[noreturn]] void mpi_abort(int code);
bool mpi_initialized();
// The rank in MPI_COMM_WORLD, or 0 before mpi_init.
int mpi_world_rank();
// The size of MPI_COMM_WORLD, or 1 before mpi_init.
int mpi_world_size();
// The rank among the processes of this node (shared-memory domain), or 0 before mpi_init. Found once,
// collectively, by mpi_init; later calls are local (any rank may ask alone).
int mpi_local_rank();
// Ranks of this job on this node (like mpi_local_rank: found by mpi_init).
int mpi_local_size();

std::unique_ptr<Communicator> make_mpi_world();  // MPI_COMM_WORLD (duplicated)
std::unique_ptr<Communicator> make_mpi_self();   // MPI_COMM_SELF (duplicated): a group of one

}  // namespace moe
