"""What a layer costs: model (the per-layer sparse-vs-dense choice, x86 rates), gpu (the H200 performance
model), calibration and calibration_layers (the x86 rates measured on this CPU)."""
