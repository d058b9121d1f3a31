"""Resident-memory probes (Linux) for benchmarks and the demo."""
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS counter (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024
