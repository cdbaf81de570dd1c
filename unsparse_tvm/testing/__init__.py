"""Test helpers that ship with the package: the CUDA schedules run on PoCL (OpenCL on the CPU) and
CUDA's resource limits checked statically. Needs the test extra (pyopencl, pocl-binary-distribution)."""
