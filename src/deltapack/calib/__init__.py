"""Calibration: text loading (with an offline default), layer-by-layer activation statistics, distillation."""
