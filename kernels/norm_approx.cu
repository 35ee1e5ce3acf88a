// The kernels of norm.cu with the approximate SiLU (sigmoid_approx in common.cuh): the same
// names and arguments, in a module of their own (`norm_approx`), which the host launches for
// bf16/fp16 programs with KernelConfig::approx_silu (INVDIFF_APPROX_SILU).
#define INVDIFF_SILU_APPROX
#include "norm.cu"
