"""Triton kernels of the project.

Kept in a package of their own because `import triton` runs at the top of the kernel
modules (the `@triton.jit` decorator decides at definition time whether a kernel is
compiled or interpreted, from TRITON_INTERPRET). Import them only through
`megatron.model.triton_attention`, which imports them lazily, so that the rest of the
project imports on machines without triton.
"""
