"""Is the physically pruned network the masked one? Outputs compared in true fp32.

Physical pruning is checked against the masked network it came from (the pipeline, the
prunability trial) and an ONNX export against PyTorch; both compare outputs here.
"""

from __future__ import annotations

import torch

__all__ = ["check_equivalence", "exact_fp32"]


class exact_fp32:
    """TF32 off inside (cuDNN/cuBLAS use it by default on Ampere+), so fp32 means fp32."""

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


@torch.no_grad()
def check_equivalence(masked: torch.Tensor, pruned: torch.Tensor, tolerance: float = 1e-4,
                      labels: tuple[str, str] = ("masked", "pruned")) -> float:
    """Max abs difference between masked and pruned outputs (or any reference and candidate, named by ``labels``);
    raises if above ``tolerance`` (times the reference's scale, at least 1) or not finite."""
    reference, candidate = labels
    if not (torch.isfinite(masked).all() and torch.isfinite(pruned).all()):
        raise RuntimeError(f"{reference} or {candidate} network outputs are not finite (NaN/inf): the run diverged")
    diff = float((masked.float() - pruned.float()).abs().max())
    scale = float(masked.float().abs().max().clamp(min=1.0))
    if diff > tolerance * scale:
        raise RuntimeError(f"{candidate} network differs from the {reference} one: max |diff| {diff:.3e} > "
                           f"{tolerance} x {scale:.3g}")
    return diff
