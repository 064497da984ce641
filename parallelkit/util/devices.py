"""The data sheet: peak dense TFLOP/s of the GPUs a projection or an MFU can be judged against."""
from __future__ import annotations

# Dense peak TFLOP/s per device, from the vendors' data sheets (no sparsity); fp32 is plain FP32 (not TF32), since
# parallelkit does not enable TF32.
CUDA_PEAK_TFLOPS = {  # name fragment -> {precision: TFLOP/s}
    "GH200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100S": {"bf16": 0.0, "fp16": 130.0, "fp32": 16.4},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
}


def device_entry(name: str) -> str | None:
    """The data-sheet entry of a device name: the exact entry, else the longest entry that is a whole word of
    the name ("NVIDIA L40" is an L40, not an L4; "NVIDIA H100 PCIe" the PCIe card)."""
    low = str(name).lower()
    exact = next((k for k in CUDA_PEAK_TFLOPS if k.lower() == low), None)
    if exact:
        return exact
    words = f" {low.replace('-', ' ')} "
    found = [k for k in CUDA_PEAK_TFLOPS if f" {k.lower()} " in words]
    if not found:  # a model number with a suffix: "V100S", "H100-SXM5" keep their entry's name as a prefix
        found = [k for k in CUDA_PEAK_TFLOPS if f" {k.lower()}" in words]
    return max(found, key=len) if found else None


def device_with_peak(name: str, precision: str) -> str | None:
    """The data-sheet entry of a device name that gives a peak for ``precision``, or None."""
    key = device_entry(name)
    return key if key is not None and CUDA_PEAK_TFLOPS[key].get(precision) else None
