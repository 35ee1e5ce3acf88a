// Timing support for the per-step profile (`CudaUnet::profile`, src/cuda/unet/mod.rs).
//
// The profile launches a pass's steps one by one with a CUDA event recorded between consecutive
// steps. Launched that way, each step would start only when the host got round to launching it,
// and the events would time the host's launch latency along with short kernels. So each profiled
// iteration starts with `timing_hold`, which keeps the stream busy for a fixed stretch of device
// time while the host enqueues every launch and event of the iteration behind it; the steps then
// run back to back, as in a graph replay.
#include "common.cuh"

// Nanoseconds of the device's global timer.
DEVI unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// One thread waits, mostly asleep, until `ns` nanoseconds have passed since it started; every
// other thread returns at once. Reads and writes no memory. Launch: one block of 32 threads.
extern "C" __global__ void timing_hold(unsigned long long ns) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const unsigned long long start = global_ns();
    while (global_ns() - start < ns) __nanosleep(2000);
}
