"""Calibration: data for calibrated algorithms, statistics hooks, the sequential block runner."""

from lowbit.calibration.data import CalibrationSet, calibration_set

__all__ = ["CalibrationSet", "calibration_set"]
