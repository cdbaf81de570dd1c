"""The sparse operators and their weight formats: what the rewrite passes emit and the schedules schedule.

formats (ell / hyb / vellV rows, ConvGeometry), quant_formats (weight-quantised rows), int8_formats (int8
quads); sparse (the TE sparse direct conv and linear operators), sparse_quant and sparse_int8 (their
quantised-weight and int8 forms), fast_math (a vectorisable exp); names (the operator names the passes and
the schedules agree on)."""
