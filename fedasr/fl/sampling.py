"""Which clients train in a round: Flower's seeded node sample, made reproducible, and (simulation) the partition
each sampled virtual node trains."""

from __future__ import annotations

import random

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedasr.fl.protocol import PARTITION_ID


class SortedNodeGrid:
    """A view of a Grid whose node ids come sorted, so a seeded sample is reproducible for a given set of nodes."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self):
        return sorted(self._grid.get_node_ids())

    def __getattr__(self, name):
        return getattr(self._grid, name)


def assign_partitions(messages: list[Message], seed: int, num_clients: int) -> None:
    """Give each message of a round the partition its node trains: all partitions when every client trains,
    else a sample drawn with ``seed`` (the clients then read ``partition-id`` from the round's config)."""
    if len(messages) >= num_clients:
        chosen = list(range(num_clients))
    else:
        chosen = sorted(random.Random(seed).sample(range(num_clients), len(messages)))
    for message, partition_id in zip(messages, chosen):
        content = message.content  # shared by the round's messages: give each its own config record
        config = ConfigRecord({**content["config"], PARTITION_ID: partition_id})
        message.content = RecordDict({**content, "config": config})
