"""Calibration: data for calibrated algorithms, statistics hooks, the sequential block runner."""

from lowbit.calibration.capture import BlockCall, block_output, capture_block_inputs, module_output
from lowbit.calibration.data import (
    CalibrationSet,
    calibration_set,
    image_calibration,
    input_calibration,
)
from lowbit.calibration.hidden import HiddenStates, SpilledStates, saved_states
from lowbit.calibration.runner import BlockContext, BlockResult, BlockStore, run_sequential
from lowbit.calibration.stats import InputStats, collect_input_stats

__all__ = [
    "BlockCall",
    "BlockContext",
    "BlockResult",
    "BlockStore",
    "CalibrationSet",
    "HiddenStates",
    "InputStats",
    "SpilledStates",
    "block_output",
    "calibration_set",
    "capture_block_inputs",
    "collect_input_stats",
    "image_calibration",
    "input_calibration",
    "module_output",
    "run_sequential",
    "saved_states",
]
