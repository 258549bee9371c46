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

from .calib.calibrate import (
    CalibConfig,
    CalibrationSession,
    calibrate,
    calibration_mode,
)
from .calib.histogram import Histogram, HistogramObserver
from .calib.strategies import entropy_amax, minmax_amax, mse_amax, percentile_amax
from .calib.table import CalibrationTable, TapRange
from .calib.taps import BN_NORMALIZED, DerivedTap, TapInfo, TapSelection
from .errors import (
    CalibrationError,
    FileFormatError,
    NonFiniteActivationError,
    OutputError,
    TorchNvdlaError,
)

__version__ = "0.1.0"

#: public name -> the private module that defines it, imported on first access.
_LAZY = {
    "CaffeConversion": "export.caffe",
    "CaffeExport": "export.caffe",
    "CaffeNetModule": "caffe.importer",
    "CheckResult": "nvdla.calibjson",
    "EvaluationReport": "sim.evaluate",
    "ExportReport": "nvdla.calibjson",
    "Finding": "nvdla.calibjson",
    "LayerRequant": "sim.simulate",
    "NvdlaNames": "nvdla.naming",
    "OnnxComparison": "export.onnx",
    "OnnxExport": "export.onnx",
    "QuantizedWeight": "nvdla.weights",
    "Simulation": "sim.simulate",
    "SimulationPlan": "sim.simulate",
    "SweepReport": "sim.sweep",
    "TapComparison": "export.onnx",
    "TrtCache": "nvdla.trtcache",
    "TrtConversion": "nvdla.trtcache",
    "calibrate_for_nvdla": "nvdla.naming",
    "check_calib_json": "nvdla.calibjson",
    "compare_with_onnxruntime": "export.onnx",
    "convert_trt_cache": "nvdla.trtcache",
    "evaluate": "sim.evaluate",
    "export_caffe": "export.caffe",
    "export_calib_json": "nvdla.calibjson",
    "export_onnx": "export.onnx",
    "export_quantized_weights": "nvdla.export_weights",
    "import_caffe": "caffe.importer",
    "int8_simulation": "sim.simulate",
    "quantize_weight": "nvdla.weights",
    "read_calib_json": "nvdla.calibjson",
    "read_trt_cache": "nvdla.trtcache",
    "sweep": "sim.sweep",
    "write_trt_cache": "nvdla.trtcache",
}

__all__ = [
    "BN_NORMALIZED",
    "CaffeConversion",
    "CaffeExport",
    "CaffeNetModule",
    "CalibConfig",
    "CalibrationError",
    "CalibrationSession",
    "CalibrationTable",
    "CheckResult",
    "DerivedTap",
    "EvaluationReport",
    "ExportReport",
    "FileFormatError",
    "Finding",
    "Histogram",
    "HistogramObserver",
    "LayerRequant",
    "NonFiniteActivationError",
    "NvdlaNames",
    "OnnxComparison",
    "OnnxExport",
    "OutputError",
    "QuantizedWeight",
    "Simulation",
    "SimulationPlan",
    "SweepReport",
    "TapComparison",
    "TapInfo",
    "TapRange",
    "TapSelection",
    "TorchNvdlaError",
    "TrtCache",
    "TrtConversion",
    "calibrate",
    "calibrate_for_nvdla",
    "calibration_mode",
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
