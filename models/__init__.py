"""Model zoo (installed as torch_nvdla.models)."""

from torch_nvdla.models.caffe_lenet import CaffeLeNet, load_caffe_lenet
from torch_nvdla.models.digits_lenet import DigitsLeNet, load_digits_lenet
from torch_nvdla.models.resnet_cifar import ResNetCifar, load_resnet_cifar

__all__ = [
    "CaffeLeNet",
    "DigitsLeNet",
    "ResNetCifar",
    "load_caffe_lenet",
    "load_digits_lenet",
    "load_resnet_cifar",
]
