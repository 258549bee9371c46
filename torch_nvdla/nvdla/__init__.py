"""nvdla."""
