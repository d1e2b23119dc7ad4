// Stand-in for the header that a CUDA build of torch generates at build time and the CPU wheel does not
// ship; it holds this one line in every CUDA wheel. Used only by .ci/compile_cuda.sh (compile check).
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
