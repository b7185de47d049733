"""What fedasr's server loop asks of a strategy, besides Flower's ``configure_train``.

- :meth:`RoundStrategy.aggregate_round` takes the round's *usable* replies (vetted once by the caller with
  :func:`fedasr.fl.strategies.replies.usable_replies`, sorted by partition id) and returns a :class:`RoundOutcome`:
  the new global arrays and everything the round's metrics row says about the aggregation;
- :meth:`RoundStrategy.state_dict` / :meth:`RoundStrategy.load_state_dict`: what must survive a restart between
  rounds (a server optimizer's moments), as plain data for the server checkpoint.

Flower's own ``aggregate_train`` (used by ``Strategy.start`` and handy in tests) still works: it vets the replies,
then calls ``aggregate_round``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord

from fedasr.fl.strategies.replies import ArraySpec, usable_replies

Dropped = list[tuple[int, str]]  # (client, reason) of the replies left out of the aggregate


@dataclass
class RoundOutcome:
    """What a strategy made of one round's replies."""

    arrays: ArrayRecord | None = None  # the new global arrays; None: nothing aggregated, the global model is kept
    metrics: MetricRecord | None = None  # aggregated training metrics (see replies.aggregate_train_metrics)
    clients: list[int] = field(default_factory=list)  # partition ids whose updates are in ``arrays``, in order
    weights: dict[int, float] = field(default_factory=dict)  # client -> its weight; empty: the strategy does not say
    dropped: Dropped = field(default_factory=list)  # replies the strategy refused itself (e.g. a non-finite score)
    report: dict[str, float] = field(default_factory=dict)  # extra columns of the metrics row (DP diagnostics)

    @property
    def aggregated(self) -> bool:
        return self.arrays is not None


def vet_and_aggregate(strategy: RoundStrategy, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
    """``strategy.aggregate_round`` of the usable ``replies`` (checked against ``strategy.expected_arrays``); the
    unusable ones come first in the outcome's ``dropped``. The server loop vets with more context (the messages
    sent, secure rounds) and calls ``aggregate_round`` itself (fedasr/fl/round.py)."""
    kept, refused = usable_replies(replies, strategy.expected_arrays)
    return strategy.aggregate_round(server_round, kept, refused=refused)


class RoundStrategy:
    """Put before a Flower strategy class: the interface fedasr's server loop uses (see the module docstring)."""

    expected_arrays: ArraySpec | None = None  # the global arrays' spec, when the strategy knows it (reply checks)

    def aggregate_round(self, server_round: int, replies: Sequence[Message], *, refused: Dropped = ()) -> RoundOutcome:
        """Aggregate usable ``replies``; ``refused``: the caller's own refusals, reported first in ``dropped``."""
        raise NotImplementedError

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Flower's Strategy interface: (arrays, metrics) of the usable replies."""
        outcome = vet_and_aggregate(self, server_round, replies)
        return outcome.arrays, outcome.metrics

    def state_dict(self) -> dict:
        """State carried from one round to the next, as plain data (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state between rounds, but the checkpoint holds "
                             f"{sorted(state)}")
