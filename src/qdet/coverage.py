"""What really became int8: conv/linear layers and their share of the multiply-accumulates.

After every quantize qdet reports how many conv/linear layers got int8 weights and what share of
the model's MACs they carry, how many BatchNorms were folded, and every conv/linear-like op that
stayed float with the reason (user skip, unsupported op kind, computed weights). A model whose
int8 share is under `WARN_BELOW` warns, naming the largest float layers: a model that silently
stays float must never look int8.

    >>> import torch
    >>> from torch import nn
    >>> import qdet
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    >>> qm = qdet.quantize(net, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> cov = qdet.coverage(qm)
    >>> cov.int8_layers, cov.float_layers, cov.folded_batchnorms, round(cov.int8_mac_share, 2)
    (2, 0, 1, 1.0)

After `lower`, pass the lowered model to add what the runtime really executes in int8 (read back
from OpenVINO's compiled model / onnxruntime's optimised graph, see `qdet.runtimes.executed`):

    >>> int8 = qdet.lower(qm, "onnxruntime")  # doctest: +SKIP
    >>> print(qdet.coverage(qm, lowered=int8).runtime["onnxruntime"].summary())  # doctest: +SKIP
    onnxruntime executes 1 of 1 convolutions and 1 of 1 matmuls in int8
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from qdet.config import Format
from qdet.quant.opkinds import OpKind, module_kind
from qdet.runtimes.executed import RuntimeCoverage, runtime_coverage

WARN_BELOW = 0.90  # share of conv/linear MACs in int8 under which quantize warns


@dataclass
class FloatLayer:
    name: str
    macs: int
    reason: str


@dataclass
class Coverage:
    int8_layers: int
    float_layers: int
    int8_macs: int
    total_macs: int
    folded_batchnorms: int
    unfolded_batchnorms: list[str] = field(default_factory=list)
    kept_float: list[FloatLayer] = field(default_factory=list)
    untraced: list[dict[str, Any]] = field(default_factory=list)  # modules fx could not trace (run float)
    decode_ops: list[str] = field(default_factory=list)  # box decoding after the last conv/linear (float)
    runtime: dict[str, RuntimeCoverage] = field(default_factory=dict)  # after lower: what each runtime executes
    overflow_fix: str = "none"  # OverflowFix as resolved for this model
    overflow_fixed_layers: int = 0  # conv/linear whose weights it made 7-bit

    @property
    def int8_mac_share(self) -> float:
        return self.int8_macs / self.total_macs if self.total_macs else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"int8_mac_share": round(self.int8_mac_share, 4)}

    def table(self) -> str:
        """A short human-readable summary (the rows `qdet quantize` prints)."""
        lines = [f"coverage: {self.int8_layers} of {self.int8_layers + self.float_layers} conv/linear layers int8, "
                 f"{100 * self.int8_mac_share:.1f} % of {self.total_macs / 1e6:.1f} M MACs; "
                 f"{self.folded_batchnorms} BatchNorms folded"]
        if self.overflow_fixed_layers:
            lines.append(f"  7-bit weights ([-63, 63]) on {self.overflow_fixed_layers} layers, overflow fix "
                         f"{self.overflow_fix!r}: int8 kernels on x86 CPUs without VNNI add weight×activation pairs "
                         "in int16 and would saturate with 8-bit weights (--overflow-fix none keeps 8 bits)")
        if self.unfolded_batchnorms:
            lines.append(f"  BatchNorms not folded (run float): {', '.join(self.unfolded_batchnorms[:8])}")
        if self.decode_ops:
            shown = ", ".join(self.decode_ops[:6]) + (", ..." if len(self.decode_ops) > 6 else "")
            lines.append(f"  box decode kept float ({len(self.decode_ops)} ops after the last conv/linear): {shown}")
        for u in self.untraced[:8]:
            what = "fx cannot follow this weight-free op, it runs float as one node" if u.get("opaque") \
                else "untraceable, its own code runs float"
            lines.append(f"  {what}: {u['path']} ({u['reason']})")
        for layer in sorted(self.kept_float, key=lambda f: -f.macs)[:8]:
            lines.append(f"  float: {layer.name} ({layer.macs / 1e6:.2f} M MACs): {layer.reason}")
        lines += [f"  {rc.summary()}" for rc in self.runtime.values()]
        return "\n".join(lines)

    def add_runtime(self, lowered: nn.Module) -> RuntimeCoverage | None:
        """Record what the runtime of `lowered` (from `qdet.lower`) executes in int8; None if it cannot tell."""
        rc = runtime_coverage(lowered)
        if rc is not None:
            self.runtime[rc.runtime] = rc
        return rc


def coverage(qmodel: Any, *, lowered: nn.Module | None = None) -> Coverage:
    """The coverage of a QuantizedModel (from its layer records and its rewritten graph); with
    `lowered` (`qdet.lower(qmodel, ...)`), also the runtime's own count of int8 convs/matmuls."""
    int8 = [r for r in qmodel.layers if r.kind in ("conv", "linear") and r.format is not Format.FLOAT]
    flt = [r for r in qmodel.layers if r.kind in ("conv", "linear") and r.format is Format.FLOAT]
    kept = [FloatLayer(r.name, r.macs, r.reason or "skipped by the configuration") for r in flt]
    untraced = list(getattr(qmodel, "untraced", []))
    kept += [FloatLayer(u.path, 0, f"untraceable forward uses {u.own_weights} weights directly (MACs not counted)")
             for u in untraced if u.own_weights]
    unfolded = [f"{path}.{name}" if path else name for path, region in qmodel.regions.items()
                for name, m in region.module.named_modules() if module_kind(m) is OpKind.BATCHNORM]
    cov = Coverage(
        int8_layers=len(int8), float_layers=len(kept), int8_macs=sum(r.macs for r in int8),
        total_macs=sum(r.macs for r in int8 + flt),
        folded_batchnorms=sum(len(region.folded_bn) for region in qmodel.regions.values()),
        unfolded_batchnorms=unfolded,
        kept_float=kept,
        untraced=[asdict(u) for u in untraced],
        decode_ops=[op for region in qmodel.regions.values() for op in region.float_ops],
        overflow_fix=qmodel.config.overflow_fix.value,
        overflow_fixed_layers=_overflow_fixed_layers(qmodel),
    )
    if lowered is not None:
        cov.add_runtime(lowered)
    return cov


def _overflow_fixed_layers(qmodel: Any) -> int:
    """Conv/linear layers whose 8-bit weight spec the overflow fix narrowed to 7 bits."""
    from qdet.config import OverflowFix
    from qdet.quant.quantizer import weight_quantizers

    if qmodel.config.overflow_fix in (OverflowFix.NONE, OverflowFix.AUTO):
        return 0
    return sum(q.spec.bits == 7 and q.spec.signed and q.spec.symmetric
               for region in qmodel.regions.values() for _, q in weight_quantizers(region.module))


def warn_if_mostly_float(cov: Coverage) -> None:
    """Warn when under WARN_BELOW of the conv/linear MACs run int8, naming the largest float layers."""
    if cov.total_macs and cov.int8_mac_share < WARN_BELOW:
        largest = sorted(cov.kept_float, key=lambda f: -f.macs)[:3]
        names = "; ".join(f"{f.name} ({f.reason})" for f in largest)
        warnings.warn(f"only {100 * cov.int8_mac_share:.1f} % of the conv/linear MACs are int8; largest float layers: "
                      f"{names}", stacklevel=3)


def warn_if_runtime_float(rc: RuntimeCoverage | None) -> None:
    """Warn when the runtime executes some conv/matmul in float (a Q/DQ pattern it did not fuse)."""
    if rc is not None and rc.float_names:
        warnings.warn(rc.summary(), stacklevel=3)
