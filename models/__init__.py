"""Model zoo (installed as torch_nvdla.models)."""
