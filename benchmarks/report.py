"""Shared by the benchmarks: machine description, byte counts, and BENCHMARKS.md sections."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine() -> dict[str, object]:
    """The machine a result was measured on: CPU model, vendor, family/model/stepping and the
    ISA flags that decide kernel speed (`dq.kernels.choice.machine`), cores, torch, date."""
    from dq.kernels.choice import machine as kernel_machine

    info = kernel_machine()
    out = {k: info[k] for k in ("cpu", "vendor", "family_model_stepping", "isa", "torch")}
    out.update(cores=str(os.cpu_count()), date=time.strftime("%Y-%m-%d"))
    if info["cuda"]:
        out["gpu"] = info["cuda"]
    return out


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao) at their parts."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return tensor_bytes(t.data)
    return t.numel() * t.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def update_section(name: str, markdown: str) -> None:
    """Replace (or append) the block between <!-- name:start --> and <!-- name:end -->."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
