"""The checks convert() and plan() share: each error names the value, the rule and the fix."""

from __future__ import annotations

from .._checks import is_count, is_number
from ..errors import ConfigError
from .heads import HEADS

__all__ = ["BALANCES", "validate_knobs"]

BALANCES = ("flops", "time", "params", "memory")


def validate_knobs(*, blocks, cuts, workers, leaders, balance, head="linear") -> None:
    """Check the knobs convert() and plan() share; each error names the value, the rule and the fix."""
    if blocks is not None and cuts is not None:
        raise ConfigError(f"give blocks= or cuts=, not both (got blocks={blocks!r}, cuts={list(cuts)!r})")
    if blocks is not None and not is_count(blocks, 1):
        raise ConfigError(f"blocks={blocks!r} must be an int >= 1 (the paper uses 4)")
    if cuts is not None and (isinstance(cuts, str) or not all(isinstance(c, str) for c in cuts)):
        raise ConfigError(f"cuts={cuts!r} must be a list of cut names, e.g. cuts=['layer1', 'layer2']")
    if not is_count(workers, 1):
        raise ConfigError(f"workers={workers!r} must be an int >= 1 (1 = block-wise workers)")
    if not is_number(leaders) or not 0 < leaders <= 1:
        raise ConfigError(
            f"leaders={leaders!r} must be a fraction in (0, 1]: the share of workers that lead "
            f"(the paper's default is 0.7; 1.0 makes every worker a leader)"
        )
    if balance not in BALANCES:
        raise ConfigError(f"balance={balance!r} must be one of {BALANCES}")
    if not (head in HEADS or callable(head)):
        raise ConfigError(
            f"head={head!r} must be one of {HEADS} or a callable head(channels, num_classes, workers) -> nn.Module"
        )
    if head in ("lookahead", "lookahead-layer") and workers != 1:
        raise ConfigError(
            f"head={head!r} with workers={workers}: a look-ahead head copies the next block's first stage, "
            f"which mixes all channels, so it is block-wise only. Use workers=1, or head='linear' for filter-wise "
            f"workers."
        )
