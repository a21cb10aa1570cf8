"""Machine limits measured on the spot, so every speed figure can be set against what the hardware allows."""

from edgellm.perf.hardware import HardwareProfile, cpu_model_name, measure_hardware

__all__ = ["HardwareProfile", "cpu_model_name", "measure_hardware"]
