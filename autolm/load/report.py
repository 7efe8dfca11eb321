"""The load report: what one from_pretrained call did, and how long each stage took."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """Files, dtype decisions, placement and seconds per stage of one from_pretrained call."""

    source: str = ""
    directory: str = ""
    files: list[str] = field(default_factory=list)
    format: str = ""
    dtype: str = ""
    dtype_decision: str = ""
    cast_tensors: int = 0
    zero_copy_tensors: int = 0
    tensors: int = 0
    bytes: int = 0
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _t: float = field(default_factory=time.perf_counter, repr=False)

    def lap(self, stage: str) -> None:
        """Add the time since the last lap to `stage`."""
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now

    def lines(self) -> list[str]:
        total = sum(self.seconds.values())
        out = [
            f"source:     {self.source}",
            f"directory:  {self.directory}",
            f"format:     {self.format} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})",
            f"dtype:      {self.dtype} ({self.dtype_decision})",
            f"tensors:    {self.tensors} ({self.bytes / 1e6:.1f} MB), {self.zero_copy_tensors} zero-copy, "
            f"{self.cast_tensors} cast",
            f"device:     {self.device}",
            "seconds:    "
            + ", ".join(f"{k} {v:.3f}" for k, v in self.seconds.items())
            + f" (total {total:.3f})",
        ]
        return out + [f"note:       {n}" for n in self.notes]

    def __str__(self) -> str:
        return "\n".join(self.lines())
