"""Which clients train in a round: Flower's seeded node sample, made reproducible, and (simulation) the partition
each sampled virtual node trains, on however many SuperNodes the federation has.

Simulation (``run.assign_partitions``): the strategy samples from one slot per client (:class:`ClientSlotGrid`),
so its sample never waits for nodes; the server assigns each sampled message a partition
(:func:`assign_partitions`) and then spreads the messages over the SuperNodes there are (:meth:`ClientSlotGrid.route`):
4 silos on Flower's default of 2 simulated SuperNodes train 2 a node, 4 silos on 10 SuperNodes use 4 of them.
Deployment: each SuperNode trains its own data, so the run needs ``clients_per_round`` of them; the first round waits
for them at most ``node_wait`` seconds (:func:`wait_for_nodes`), then stops with an error that says what to start.
"""

from __future__ import annotations

import logging
import random
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedasr.fl.protocol import PARTITION_ID

log = logging.getLogger(__name__)

NODE_WAIT_SECONDS = 30.0  # deployment: how long the first round waits for the SuperNodes it needs


class NotEnoughNodesError(RuntimeError):
    """Fewer SuperNodes than the run needs (deployment), or than a secure-aggregation round needs (simulation)."""


def is_simulation_grid(grid) -> bool:
    """True for the Grid of Flower's Simulation Engine (``fedasr federate`` and ``flwr run`` on a local simulation
    SuperLink): its SuperNodes are virtual, so the server may give them any partition."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


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


class ClientSlotGrid(SortedNodeGrid):
    """Simulation: a view of the Grid in which the strategy sees one node per client (ids 0..num_clients-1), so
    Flower's ``min_available_nodes`` wait is always met and its seeded sample depends on the clients alone; the
    sampled messages are then routed to the real SuperNodes with :meth:`route`."""

    def __init__(self, grid: Grid, num_clients: int) -> None:
        super().__init__(grid)
        self.num_clients = int(num_clients)

    def get_node_ids(self):
        return list(range(self.num_clients))

    def route(self, messages: list[Message], *, distinct: bool = False) -> None:
        """Address the messages to the SuperNodes there are, in turn (a node trains several partitions one after
        the other when there are fewer nodes than messages). ``distinct``: each message needs a node of its own
        (SecAgg+ keeps one update per node between its two exchanges)."""
        nodes = sorted(self._grid.get_node_ids())
        if not nodes:
            raise NotEnoughNodesError("the simulation has no SuperNodes: set num-supernodes to the number of clients")
        if distinct and len(nodes) < len(messages):
            raise NotEnoughNodesError(
                f"secure aggregation needs one SuperNode per client of a round: {len(messages)} clients train but "
                f"the simulation has {len(nodes)} SuperNodes. Set num-supernodes to at least {len(messages)} "
                f"(flwr run . --federation-config \"num-supernodes={len(messages)}\", or options.num-supernodes "
                "of the connection in $FLWR_HOME/config.toml), or lower clients_per_round")
        if len(nodes) < len(messages):
            log.debug("%d clients on %d simulated SuperNodes: %d per node", len(messages), len(nodes),
                      -(-len(messages) // len(nodes)))
        for index, message in enumerate(messages):
            message.metadata.dst_node_id = nodes[index % len(nodes)]


def wait_for_nodes(grid: Grid, needed: int, timeout: float = NODE_WAIT_SECONDS, *, what: str = "") -> list[int]:
    """The SuperNodes connected once ``needed`` are (deployment), waiting at most ``timeout`` seconds; then
    NotEnoughNodesError naming what to start. ``what``: why that many (for the message)."""
    deadline = time.monotonic() + max(0.0, float(timeout))
    next_note = time.monotonic() + 5.0
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        now = time.monotonic()
        if now >= deadline:
            raise NotEnoughNodesError(
                f"{len(nodes)} SuperNode(s) connected after {timeout:g} s, the run needs {needed}{what}. On the "
                f"Deployment Engine start one SuperNode per silo (flower-supernode ... --node-config "
                f"\"partition-id=I num-partitions={needed}\"), or lower num-clients / clients_per_round in the run "
                "config; a local simulation federation (num-supernodes in $FLWR_HOME/config.toml or "
                "--federation-config \"num-supernodes=N\") maps the clients onto the SuperNodes it has and never "
                "needs this. Wait longer with --run-config \"node-wait=SECONDS\".")
        if now >= next_note:
            log.info("waiting for SuperNodes: %d connected, %d needed (at most %.0f s more)", len(nodes), needed,
                     deadline - now)
            next_note = now + 5.0
        time.sleep(0.5)
