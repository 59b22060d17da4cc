// cuda_tests run without --gtest_filter (as the GPU check runs it) runs its CUDA cases only, not the CPU
// cases of the op tables it links (tests/mpi_main.cc).
const char* moe_default_gtest_filter = "*Cuda*";
