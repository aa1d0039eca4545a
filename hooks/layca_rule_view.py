"""Read-only views of the rate rule a Layca optimizer holds, shared by the PyTorch and Keras Layca."""

from __future__ import annotations

import numpy as np

from layrot.core.rates import RateRule


class RuleView:
    """Mixin: properties over ``_rule`` (in force), ``_base_rule`` (the job's own) and ``_rho_max``."""

    _rule: RateRule
    _base_rule: RateRule
    _rho_max: float

    @property
    def rule(self) -> RateRule:
        """The rule in force (it governs the next step)."""
        return self._rule

    @property
    def base_rule(self) -> RateRule:
        """The job's own rule (constructor / set_rule); ``mode="off"`` commands return to it."""
        return self._base_rule

    @property
    def command_version(self) -> int:
        """Version of the RateCommand in force (0 = the job's own settings)."""
        return self._rule.version

    @property
    def rho_max(self) -> float:
        """The largest rate any rule may produce; commands above it are refused."""
        return self._rho_max

    @property
    def mode(self) -> str:
        """ "layca", "lars" or "off" under the rule in force."""
        return self._rule.mode

    def rates_at(self, step: int) -> np.ndarray:
        """rho_l for optimizer step ``step`` under the rule in force (float64, layer order)."""
        return self._rule.rates(step)
