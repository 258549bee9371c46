"""torch_nvdla: PyTorch-native INT8 calibration for the NVDLA deep-learning accelerator.

``calibrate(model, loader)`` streams every tap of a model into device-side histograms
and picks one symmetric range per tap -- its **amax**; ``scale = amax / 127`` -- with the
entropy (TensorRT EntropyCalibrator2-style), min-max, percentile or MSE strategy. The
rest turns a table into what NVDLA needs: ``export_calib_json`` (the compiler's
``--calibtable``), quantized weights, Caffe files, a Q/DQ ONNX model or a TensorRT cache,
and ``int8_simulation`` / ``evaluate`` / ``sweep`` predict what INT8 will cost.

The calibration core is imported eagerly; the exporters and simulators are imported on
first use (so ``import torch_nvdla`` needs neither onnx nor torchvision).
"""

from importlib import import_module as _import_module

from ._calibrate import CalibConfig, calibrate
from ._errors import CalibrationError, FileFormatError, NonFiniteActivationError, TorchNvdlaError
from ._histogram import Histogram, HistogramObserver
from ._strategies import entropy_amax, minmax_amax, mse_amax, percentile_amax
from ._table import CalibrationTable, TapRange
from ._taps import BN_NORMALIZED, DerivedTap, TapInfo, TapSelection

__version__ = "0.1.0"

#: public name -> the private module that defines it, imported on first access.
_LAZY = {
    "NvdlaNames": "_naming",
    "calibrate_for_nvdla": "_naming",
    "check_calib_json": "_calibjson",
    "compare_with_onnxruntime": "_onnx",
    "convert_trt_cache": "_trtcache",
    "evaluate": "_evaluate",
    "export_caffe": "_caffe_export",
    "export_calib_json": "_calibjson",
    "export_onnx": "_onnx",
    "export_quantized_weights": "_export_weights",
    "import_caffe": "_caffe_import",
    "int8_simulation": "_simulate",
    "quantize_weight": "_weights",
    "read_calib_json": "_calibjson",
    "read_trt_cache": "_trtcache",
    "sweep": "_sweep",
    "write_trt_cache": "_trtcache",
}

__all__ = [
    "BN_NORMALIZED",
    "CalibConfig",
    "CalibrationError",
    "CalibrationTable",
    "DerivedTap",
    "FileFormatError",
    "Histogram",
    "HistogramObserver",
    "NonFiniteActivationError",
    "NvdlaNames",
    "TapInfo",
    "TapRange",
    "TapSelection",
    "TorchNvdlaError",
    "calibrate",
    "calibrate_for_nvdla",
    "check_calib_json",
    "compare_with_onnxruntime",
    "convert_trt_cache",
    "entropy_amax",
    "evaluate",
    "export_caffe",
    "export_calib_json",
    "export_onnx",
    "export_quantized_weights",
    "import_caffe",
    "int8_simulation",
    "minmax_amax",
    "mse_amax",
    "percentile_amax",
    "quantize_weight",
    "read_calib_json",
    "read_trt_cache",
    "sweep",
    "write_trt_cache",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torch_nvdla' has no attribute {name!r}")
    value = getattr(_import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
