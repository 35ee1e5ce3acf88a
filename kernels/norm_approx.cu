// The kernels of norm.cu that take a `silu` argument, with the approximate SiLU (sigmoid_approx
// in norm.cu): the same names and arguments, in a module of their own (`norm_approx`), which
// the host launches for bf16/fp16 programs with KernelConfig::approx_silu (INVDIFF_APPROX_SILU).
#define INVDIFF_SILU_APPROX
#include "norm.cu"
