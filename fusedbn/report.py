"""``Report``: what a model transform did. Every transform (``convert_model``, ``fuse_model``,
``fold_conv_bn``, ``freeze``, ``revert_model``) returns the model and, given ``report=Report()``, records
in it each module it changed and each it left alone, with the reason."""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class Report:
    """``done``: (action, module name, detail) per change, e.g. ``("fused", "layer1.0.bn1", "relu")``;
    ``skipped``: (module name, reason) per module left as it was."""

    done: List[Tuple[str, str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def count(self, action: str, detail: Optional[str] = None) -> int:
        """How many changes of ``action`` (and ``detail``, when given) were made."""
        return sum(a == action and (detail is None or d == detail) for a, _, d in self.done)

    def __str__(self) -> str:
        kinds = {}
        for action, _, detail in self.done:
            key = f"{action} ({detail})" if detail else action
            kinds[key] = kinds.get(key, 0) + 1
        text = ", ".join(f"{key}: {n}" for key, n in kinds.items()) or "nothing changed"
        if self.skipped:
            text += f"; left alone: {len(self.skipped)} (" + "; ".join(f"{n}: {r}" for n, r in self.skipped) + ")"
        return text
