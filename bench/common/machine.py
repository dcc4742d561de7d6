"""The machine a benchmark ran on: cores, CPU model and flags, memory, load, versions."""
from __future__ import annotations

import os
import platform
from typing import Dict, List

# CPU features that decide how fast TensorFlow's CPU kernels can be (oneDNN picks its code
# path from these: AVX-512, VNNI for int8, BF16/AMX for bfloat16).
_INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                      "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")

_PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "scipy", "opencv-python",
             "opencv-python-headless", "pillow", "scikit-image", "scikit-learn", "matplotlib",
             "psutil")


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    """The performance-relevant subset of the CPU's flags (first processor)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _INTERESTING_FLAGS if flag in present]
    except OSError:
        pass
    return []


def load_average() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions() -> Dict[str, str]:
    """Installed versions (package metadata; nothing heavy is imported)."""
    from importlib import metadata
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine_info() -> dict:
    """Cores, CPU model and flags, memory, platform, load average and versions."""
    memory_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    memory_gb = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cores": os.cpu_count(), "usable_cores": usable, "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(), "memory_gb": memory_gb, "platform": platform.platform(),
            "load_average_at_start": load_average(), "versions": versions()}


def describe_machine(machine: dict) -> str:
    """One line for the console."""
    v = machine.get("versions", {})
    tf = v.get("tensorflow-cpu") or v.get("tensorflow")
    return (f"machine: {machine['cores']} cores ({machine['cpu_model']}; "
            f"{' '.join(machine['cpu_flags'])}), {machine['memory_gb']} GB, load "
            f"{machine['load_average_at_start']}; python {v.get('python')}, tensorflow {tf}, "
            f"keras {v.get('keras')}, numpy {v.get('numpy')}")
