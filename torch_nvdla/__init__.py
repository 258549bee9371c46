"""torch_nvdla: PyTorch-native INT8 calibration for the NVDLA deep-learning accelerator.

``calibrate(model, loader)`` streams every tap of a model into device-side histograms
and picks one symmetric range per tap (``amax``; ``scale = amax / 127``) with the
entropy (TensorRT EntropyCalibrator2-style), min-max, percentile or MSE strategy.
"""

from ._calibrate import CalibConfig, calibrate
from ._errors import CalibrationError, FileFormatError, NonFiniteActivationError, TorchNvdlaError
from ._histogram import Histogram, HistogramObserver
from ._strategies import entropy_amax, minmax_amax, mse_amax, percentile_amax
from ._table import CalibrationTable, TapRange
from ._taps import BN_NORMALIZED, DerivedTap, TapInfo, TapSelection

__version__ = "0.1.0"

__all__ = sorted([
    "BN_NORMALIZED",
    "CalibConfig",
    "CalibrationError",
    "CalibrationTable",
    "DerivedTap",
    "FileFormatError",
    "Histogram",
    "HistogramObserver",
    "NonFiniteActivationError",
    "TapInfo",
    "TapRange",
    "TapSelection",
    "TorchNvdlaError",
    "calibrate",
    "entropy_amax",
    "minmax_amax",
    "mse_amax",
    "percentile_amax",
])
