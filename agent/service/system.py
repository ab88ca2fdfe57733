"""This rank's host and GPU metrics, sampled on the agent thread once per heartbeat.

Every heartbeat carries them as ``system`` (so the recording has them; ``neurotop export``
writes them as the ``system`` table). CPU and memory come from the OS with no dependency
(``os.times``; Linux's ``/proc/stat``, ``/proc/self/statm`` and ``/proc/meminfo``, None
elsewhere); GPUs from NVIDIA's management library where ``pynvml`` (the ``nvidia-ml-py``
package, ``neurotop[gpu]``) is importable, else ``no_gpu`` says why. Never on the training
thread: an NVML query can take milliseconds. Torch-free.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("neurotop.agent")

#: CPU percentages are measured over at least this long (a shorter interval repeats the
#: last one): ``os.times`` ticks every 10 ms, which over less is more noise than signal.
MIN_INTERVAL_S = 0.1
NO_PYNVML = "no pynvml (pip install 'neurotop[gpu]' for GPU metrics)"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _host_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all the host's CPUs since boot; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait; guest time is already in user and nice
    return sum(fields) - idle, sum(fields)


def _rss_bytes() -> int | None:
    """Resident memory of this process (what ``VmRSS`` in /proc/PID/status says)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _host_memory() -> tuple[int | None, int | None]:
    """The host's (total, available) memory in bytes; None where /proc/meminfo is absent."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    values[key] = int(rest.split()[0]) * 1024  # kB
                    if len(values) == 2:
                        break
    except (OSError, ValueError, IndexError):
        pass
    return values.get("MemTotal"), values.get("MemAvailable")


class SystemSampler:
    """``sample()`` once per heartbeat, from the agent thread; ``close()`` when it ends.

    CPU percentages are over the interval since the previous measurement (None until
    there is one): ``cpu_pct`` is this process's, all threads, in percent of one core
    (as ``top`` shows it: up to 100 x ``cpus``); ``host_cpu_pct`` the whole host's, in
    percent of all its cores."""

    def __init__(self) -> None:
        self._gpus: Gpus | None = None  # opened at the first sample, on the agent thread
        self._prev: tuple[float, float, tuple[int, int] | None] | None = None
        self._pct: tuple[float | None, float | None] = (None, None)

    def sample(self) -> dict[str, Any]:
        if self._gpus is None:
            self._gpus = Gpus()
        cpu_pct, host_pct = self._cpu()
        total, available = _host_memory()
        return {"cpu_pct": cpu_pct, "host_cpu_pct": host_pct, "cpus": os.cpu_count(),
                "rss": _rss_bytes(), "mem_total": total, "mem_available": available,
                "gpus": self._gpus.sample(), "no_gpu": self._gpus.reason}

    def close(self) -> None:
        if self._gpus is not None:
            self._gpus.close()

    def _cpu(self) -> tuple[float | None, float | None]:
        t = os.times()
        now, cpu, host = time.monotonic(), t.user + t.system, _host_cpu_ticks()
        if self._prev is not None and now - self._prev[0] < MIN_INTERVAL_S:
            return self._pct
        if self._prev is not None:
            t0, cpu0, host0 = self._prev
            host_pct = None
            if host is not None and host0 is not None and host[1] > host0[1]:
                host_pct = round(100.0 * (host[0] - host0[0]) / (host[1] - host0[1]), 1)
            self._pct = (round(100.0 * (cpu - cpu0) / (now - t0), 1), host_pct)
        self._prev = (now, cpu, host)
        return self._pct


class Gpus:
    """NVML handles of the GPUs this process may use, or ``reason`` why there are none.

    The visible GPUs are those ``CUDA_VISIBLE_DEVICES`` names (indices or UUIDs, up to the
    first that names no device, as CUDA reads it), or else all of them; ``index`` is the
    device's place in that list, in NVML's PCI bus order: ``cuda:<index>`` wherever CUDA
    numbers them the same way (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or GPUs of one model)."""

    def __init__(self) -> None:
        self.reason = ""
        self._nvml: Any = None
        self._devices: list[tuple[Any, dict[str, Any]]] = []  # (handle, static fields)
        self._failed: set[tuple[str, str]] = set()  # (uuid, field) whose error was logged
        try:
            import pynvml
        except ImportError:
            self.reason = NO_PYNVML
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self.reason = f"NVML unavailable: {e}"
            return
        self._nvml = pynvml
        try:
            self._devices = self._visible()
        except pynvml.NVMLError as e:
            self.reason = f"NVML could not list the GPUs: {e}"
        if not self._devices and not self.reason:
            env = os.environ.get("CUDA_VISIBLE_DEVICES")
            self.reason = ("no NVIDIA device visible" if env is None
                           else f"no NVIDIA device visible (CUDA_VISIBLE_DEVICES={env!r})")
        if self.reason:
            self.close()

    def _visible(self) -> list[tuple[Any, dict[str, Any]]]:
        nv = self._nvml
        every = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
        uuids = [_text(nv.nvmlDeviceGetUUID(h)) for h in every]
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        handles = every
        if env is not None:
            handles = []
            for entry in (e.strip() for e in env.split(",")):
                if entry.isdigit():
                    if int(entry) >= len(every):
                        break
                    handles.append(every[int(entry)])
                    continue
                if not entry:
                    break
                found = [h for h, u in zip(every, uuids, strict=True) if u.startswith(entry)]
                if len(found) == 1:
                    handles.append(found[0])
                    continue
                try:  # a MIG instance is not among the listed devices
                    handles.append(nv.nvmlDeviceGetHandleByUUID(entry))
                except nv.NVMLError:
                    break
        return [(h, {"index": i, "name": _text(nv.nvmlDeviceGetName(h)),
                     "uuid": _text(nv.nvmlDeviceGetUUID(h))}) for i, h in enumerate(handles)]

    def sample(self) -> list[dict[str, Any]]:
        """Each visible GPU: ``util`` (%), ``mem_used`` and ``mem_total`` (bytes),
        ``power_w`` and ``temp_c``; a value the device does not report is None."""
        return [{**static, **self._query(h, static["uuid"])} for h, static in self._devices]

    def _query(self, h: Any, uuid: str) -> dict[str, Any]:
        nv = self._nvml
        reads = {"util": lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu,
                 "mem": lambda: nv.nvmlDeviceGetMemoryInfo(h),
                 "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,  # milliwatts
                 "temp_c": lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)}
        out: dict[str, Any] = {}
        for name, read in reads.items():
            try:
                out[name] = read()
            except nv.NVMLError as e:  # not supported (a MIG slice), or the GPU is lost
                out[name] = None
                if (uuid, name) not in self._failed:
                    self._failed.add((uuid, name))
                    log.warning("neurotop: GPU %s reports no %s: %s", uuid, name, e)
        mem = out.pop("mem")
        out["mem_used"], out["mem_total"] = (mem.used, mem.total) if mem else (None, None)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                log.warning("neurotop: NVML shutdown failed: %s", e)
            self._nvml = None
            self._devices = []


def _text(v: str | bytes) -> str:
    """NVML strings: bytes in older bindings, str in newer ones."""
    return v.decode() if isinstance(v, bytes) else v
