#!/usr/bin/env bash
# Single-GPU NCCL test mode: runs one rank of an mpirun job as if it were alone on its own host, so that
# several ranks can share one GPU (NCCL refuses two ranks of one communicator on the same GPU of the
# same host: "Duplicate GPU detected"). Each rank gets its own NCCL_HOSTID; P2P and shared-memory
# transports are off, so the ranks talk over sockets. An environment setting for tests, not a code path.
#   mpirun -n 2 tests/cuda_dist/rank_env.sh build/cuda_dist_tests
rank="${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-0}}}"
export NCCL_HOSTID="moe-test-rank-${rank}"
export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
exec "$@"
