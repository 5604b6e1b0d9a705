"""Tuned configs per GPU: ``configs/<gpu-slug>.json``, loaded lazily on first lookup for a device.

File format::

    {"meta": {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
              "angel_kernels": "0.1.0", "created": "2026-11-26T12:00:00Z"},
     "kernels": {"w8a16.tiled": {"N=28672,K=4096,M=16": {"BLOCK_M": 16, ...}}}}

Nothing is read at import time and no GPU is queried until a lookup names a CUDA device.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from pathlib import Path

import torch

from .prune import KernelConfig

logger = logging.getLogger("angel_kernels.tuning")

CONFIG_DIR = Path(__file__).with_name("configs")
FORMAT_VERSION = 1


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def gpu_slug(device: torch.device | str | None = None) -> str:
    """``"nvidia-h100-80gb-hbm3"`` for a CUDA device, ``"cpu"`` otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return "cpu"
    return slugify(torch.cuda.get_device_name(device))


def _version_meta(gpu_name: str) -> dict:
    import triton

    from .. import __version__

    return {
        "format": FORMAT_VERSION,
        "gpu": gpu_name,
        "torch": torch.__version__.split("+")[0],
        "triton": triton.__version__,
        "angel_kernels": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class TunedConfigStore:
    def __init__(self, directory: Path | str = CONFIG_DIR):
        self.directory = Path(directory)
        self._tables: dict[str, dict] = {}  # slug -> {"meta": ..., "kernels": ...}
        # (kernel, key, device) -> the config or None: the launchers look a config up on every call, and the GPU's
        # name, its slug and the config object cost microseconds of host time per call in eager mode
        self._found: dict[tuple, KernelConfig | None] = {}

    def _table(self, slug: str) -> dict:
        table = self._tables.get(slug)
        if table is None:
            table = self._load(slug)
            self._tables[slug] = table
        return table

    def _load(self, slug: str) -> dict:
        path = self.directory / f"{slug}.json"
        if not path.exists():
            return {"meta": {}, "kernels": {}}
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        if meta.get("format") != FORMAT_VERSION:
            logger.warning("ignoring %s: format %s, expected %s", path.name, meta.get("format"), FORMAT_VERSION)
            return {"meta": {}, "kernels": {}}
        try:
            import triton

            mine = ".".join(triton.__version__.split(".")[:2])
            theirs = ".".join(str(meta.get("triton", "")).split(".")[:2])
            if mine != theirs:
                logger.warning("%s was tuned with triton %s, running %s: configs may be off", path.name, theirs, mine)
        except ImportError:  # pragma: no cover - triton is a dependency
            pass
        return {"meta": meta, "kernels": data.get("kernels", {})}

    def lookup(self, kernel: str, key: str, device: torch.device | str) -> KernelConfig | None:
        """The tuned config for ``kernel`` at ``key`` on this device's GPU, or None (remembered per device)."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the current device: which one is it now
            device = torch.device("cuda", torch.cuda.current_device())
        found_key = (kernel, key, device)
        if found_key not in self._found:
            entry = self._table(gpu_slug(device))["kernels"].get(kernel, {}).get(key)
            self._found[found_key] = KernelConfig.from_dict(entry) if entry is not None else None
        return self._found[found_key]

    def record(self, kernel: str, key: str, cfg: KernelConfig, device: torch.device | str) -> None:
        self._table(gpu_slug(device))["kernels"].setdefault(kernel, {})[key] = cfg.as_dict()
        self._found.clear()

    def save(self, device: torch.device | str, path: Path | str | None = None) -> Path:
        device = torch.device(device)
        slug = gpu_slug(device)
        table = self._table(slug)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        out = Path(path) if path is not None else self.directory / f"{slug}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": _version_meta(name), "kernels": table["kernels"]}
        out.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        return out


_DEFAULT: TunedConfigStore | None = None


def default_store() -> TunedConfigStore:
    """The package's store (shipped configs); created on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = TunedConfigStore()
    return _DEFAULT
