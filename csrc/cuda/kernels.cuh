// The CUDA kernels of fusedbn, written in the CUDA subset the SIMT emulator (csrc/simt/simt.h) also
// compiles: no <<<>>> (launches go through FUSEDBN_LAUNCH in launch.h), no CUDA runtime calls, static
// shared memory as `__shared__ SharedArray<T, N>` of trivial types and the blocks' partials as
// BlockPartials (device_memory.h, so the emulator checks every access), full-warp shuffles, block sizes
// that are multiples of 32.
//
// Two kernel families, each one template over the element type and a small functor, one file each
// (reduce_kernels.cuh, elementwise_kernels.cuh) with what they share beside them (kernel_basics.cuh,
// coefficients.cuh, merges.cuh, reducers.cuh, finishers.cuh):
//   reductions  - per-channel partials per thread, warp merge by shuffles, block merge by a second
//                 shuffle round of the warps' totals, grid merge across the blocks of a channel by the
//                 last block to finish (an arrival counter that resets itself), whose threads all merge
//                 the blocks' partials and then call the finisher for the channel: Welford statistics
//                 (forward) or the gradient sums (backward).
//   elementwise - one read and one write per value, vectors of up to 16 bytes where alignment allows;
//                 channels-first gives each block a contiguous range and tracks the channel of each
//                 vector incrementally (no division in the loop, coefficients kept while the channel
//                 does not change), channels-last keeps each thread on fixed channels with their coefficients
//                 in registers. The per-channel coefficients are computed in the kernel from the
//                 statistics and the parameters (ChannelCoefficients), so no other kernel runs before it.
// and the one-launch training forward (channels_first_forward_kernel, forward_kernel.cuh). Every streaming
// loop issues several independent vector loads before it uses the first (the kernels' kInFlight), and every
// grid is at most one wave (host_ops.h sizes it from the instantiation's occupancy); tests/test_sass.py reads
// both from the sm_90 machine code.
// Every kernel is launched with at most kMaxBlockThreads threads per block and compiled for
// kMinResidentThreads resident threads per SM (at most 64 registers a thread), which
// tests/test_kernel_resources.py checks on the sm_90 build.
#pragma once

#include "elementwise_kernels.cuh"
#include "finishers.cuh"
#include "forward_kernel.cuh"
#include "reduce_kernels.cuh"
