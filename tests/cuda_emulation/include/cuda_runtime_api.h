// Stand-in for the CUDA runtime's header in the CPU emulation (tests/test_cuda_compile.py,
// lstm_cuda_emulated.cpp): the host code only names the stream type.
#pragma once
typedef struct CUstream_st* cudaStream_t;
