"""The hostile-input corpus: crafted checkpoints and safetensors files, built at test time.

Each :class:`Case` builds its input(s) in a fresh folder and states the expected
outcome: refused by the CLI with one line matching ``message`` (and an error of
class ``error``), or converted. ``live`` marks payloads that really run their
code under ``torch.load(weights_only=False)``: the test suite proves that with a
control run, so the sentinel check for them is not vacuous.
"""

from .cases import CASES, Case

__all__ = ["CASES", "Case"]
