"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) for fedasr's federated runs.

What is protected: the participation of one whole client (silo or speaker) in the released global models. Each
sampled client's update x_k - x is clipped to L2 norm C *on the client* (before it leaves), the server sums the
clipped updates, divides by the expected number of sampled clients m (a fixed denominator, so a client that drops
out does not raise anyone's weight) and adds Gaussian noise of std z * C / m to the average. One round is then a
Gaussian mechanism of noise multiplier z on a client-level sensitivity of C / m; the RDP accountant of Google's
``dp-accounting`` composes the rounds into (epsilon, delta) for the sampling the server does: exactly m of the N
clients each round, uniformly without replacement (:func:`client_level_epsilon`). For m < N that is accounted
under the replace-one relation (one client's data replaced by anyone else's; N is public); with every client in
every round (m = N) there is no sampling and no amplification, under add-or-remove-one. Because every round is the
same event, epsilon after round r is a pure function of (z, N, m, r, delta): nothing extra has to be checkpointed
for a resumed run.

Which Flower pieces are used, and why not the others:

- client side: Flower's ``fixedclipping_mod`` clips the flat update (it reads ``clipping_norm`` from the round's
  config, exactly as Flower's DP wrappers send it). Per-layer clipping, which Flower does not offer, is our
  :func:`clip_per_layer`: every array's update to C / sqrt(L), so the whole update stays within C and the noise
  and accounting are unchanged. :func:`clipping_mod` picks one or the other, and does nothing in a run without DP.
- server side: our :class:`ClientLevelDP` instead of ``DifferentialPrivacyClientSideFixedClipping``, because the
  Flower wrapper (flwr/serverapp/strategy/dp_fixed_clipping.py) (1) adds noise to every array, which would corrupt
  the frozen feature-normaliser statistics fedasr ships in the model and can make BatchNorm variances negative;
  (2) keeps the inner strategy's weights (FedAvg weights by examples: one large client gets a weight near 1, so
  noise calibrated for 1/m hides nothing, and the example counts are themselves private); (3) only accounts with
  ``no-amplification`` sampling and a strategy that is exactly ``FedAvg.aggregate_train``; (4) divides by the
  replies received, not by m. The noise std is still Flower's ``compute_stdv``.

Supported strategy: ``fedavg`` only (config.py refuses the others with an explanation): the softmax strategies can
give one client a weight near 1, so one client's clipped update would dominate the average and the noise would
have to scale with the largest weight, not 1/m. Under DP fedavg aggregates with uniform weights 1/m.

Not covered by the guarantee (documented in hparams/fl/cross_silo.yaml): the training metrics clients report
(loss, example counts, timings) and the diagnostics of the clipping written to metrics.jsonl. With
``secure_noise: false`` (the default, for reproducible research runs) the noise is drawn from a generator seeded by
the run's seed: anyone who knows the seed can remove it. Real deployments set ``secure_noise: true``.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from fedasr.fl.arrays import arrays_to_numpy
from fedasr.fl.strategies.base import Dropped, RoundOutcome, RoundStrategy
from fedasr.fl.strategies.replies import aggregate_train_metrics, partition_of, reply_arrays

log = logging.getLogger(__name__)

KEY_PER_LAYER_CLIPPING_NORM = "per-layer-clipping-norm"  # round-config key: clip each array's update to this norm
ACCOUNTING_METHODS = ("poisson", "no-amplification")  # of dp_epsilon (textbook figures, add-or-remove-one)
CLIENT_ACCOUNTING = ("sampled", "no-amplification")  # of client_level_epsilon: fedasr's own sampling
LEGACY_ACCOUNTING = {"poisson": "sampled"}  # privacy.accounting's old name: fedasr never sampled by Poisson
RELATIONS = ("add-or-remove-one", "replace-one")
VARIANCE_FLOOR = 1e-5  # BatchNorm running variances are kept >= this after the noise (post-processing)


# ---- clipping ----------------------------------------------------------------------------------------------------

def update_norm(update: dict[str, np.ndarray]) -> float:
    """L2 norm of a whole update (all arrays flattened together), computed in float64."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip_update(update: dict[str, np.ndarray], clipping_norm: float) -> dict[str, np.ndarray]:
    """The update scaled by min(1, C / ||update||): its norm is at most C afterwards (flat clipping)."""
    norm = update_norm(update)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in update.items()}


def per_layer_norm(clipping_norm: float, num_arrays: int) -> float:
    """Each of ``num_arrays`` arrays clipped to C / sqrt(L) keeps the whole update within C."""
    return float(clipping_norm) / math.sqrt(num_arrays)


def clip_per_layer(update: dict[str, np.ndarray], array_norm: float) -> dict[str, np.ndarray]:
    """Every array of the update clipped on its own to ``array_norm`` (per-layer clipping)."""
    return {k: clip_update({k: v}, array_norm)[k] for k, v in update.items()}


def clipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """ClientApp mod: clips the reply's update as the round's config asks; a run without DP passes through.

    ``clipping_norm`` in the config (sent by :class:`ClientLevelDP`): Flower's ``fixedclipping_mod`` (flat).
    ``per-layer-clipping-norm``: :func:`clip_per_layer` on every array. Neither: no clipping.
    """
    if msg.metadata.message_type != MessageType.TRAIN or len(msg.content.config_records) != 1:
        return call_next(msg, ctxt)
    config = next(iter(msg.content.config_records.values()))
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, ctxt, call_next)
    if KEY_PER_LAYER_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    sent = arrays_to_numpy(next(iter(msg.content.array_records.values())))
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    name, record = next(iter(reply.content.array_records.items()))
    trained = arrays_to_numpy(record)
    clipped = clip_per_layer({k: trained[k].astype(np.float64) - sent[k] for k in trained},
                             float(config[KEY_PER_LAYER_CLIPPING_NORM]))
    reply.content.array_records[name] = ArrayRecord(
        {k: Array(np.ascontiguousarray((sent[k] + clipped[k]).astype(trained[k].dtype))) for k in trained})
    return reply


# ---- accounting ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)  # a pure function of its numbers, about 1 s per call with sampling (q < 1)
def dp_epsilon(noise_multiplier: float, rounds: int, sampling_rate: float, delta: float,
               accounting: str = "poisson") -> float:
    """Epsilon at ``delta`` after ``rounds`` Gaussian releases of noise multiplier z (RDP, dp-accounting), under
    the add-or-remove-one relation.

    ``poisson``: each round samples each client independently with probability q (a cohort of variable size).
    fedasr's server does not sample so (it draws exactly m of N): for fedasr's runs use
    :func:`client_level_epsilon`; this is the textbook figure, e.g. to compare with papers that report it.
    ``no-amplification``: every round counts in full (q = 1: exact for every client in every round).
    0 rounds: 0. z = 0: infinity (no noise, no guarantee).
    """
    import dp_accounting
    from dp_accounting import rdp

    if accounting not in ACCOUNTING_METHODS:
        raise ValueError(f"accounting must be one of {ACCOUNTING_METHODS}, got {accounting!r}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate (clients_per_round / clients) must lie in (0, 1], got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if rounds < 0 or noise_multiplier < 0:
        raise ValueError(f"rounds and the noise multiplier must be >= 0, got {rounds} and {noise_multiplier}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if accounting == "poisson" and sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    absl = logging.getLogger("absl")  # it warns about fractional orders it drops; the best order is kept anyway
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = rdp.RdpAccountant()
        accountant.compose(event, int(rounds))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


@functools.lru_cache(maxsize=1024)  # about 0.5 s per call with sampling (m < N)
def client_level_epsilon(noise_multiplier: float, rounds: int, num_clients: int, clients_per_round: int,
                         delta: float, accounting: str = "sampled", relation: str | None = None) -> tuple[float, str]:
    """(epsilon at ``delta``, neighbouring relation) of fedasr's DP-FedAvg after ``rounds`` rounds, for the sampling
    its server does: exactly m = ``clients_per_round`` of the N = ``num_clients`` clients, uniformly without
    replacement, each round; noise of std z * C on the sum of the m updates clipped to C.

    - m = N (every client every round, e.g. cross-silo): no sampling, so no amplification: ``rounds`` Gaussian
      releases of noise multiplier z, under add-or-remove-one (a client joins or leaves the federation; the sum
      changes by at most C).
    - m < N: a sample of fixed size is analysed under replace-one (N is public; one client's data is replaced by
      anyone's). Replacing a client moves the sum by up to 2C, so each round is a Gaussian of noise multiplier
      z / 2 on that sensitivity, amplified by dp-accounting's ``SampledWithoutReplacementDpEvent`` (Wang, Balle and
      Kasiviswanathan 2019, Theorem 27). The lower of that bound and the unamplified one is returned (both hold;
      the sampled bound is the looser one for m close to N).

    ``accounting="no-amplification"`` counts every round in full whatever m. ``relation="replace-one"`` gives the
    replace-one figure for m = N too (to compare with sampled runs); add-or-remove-one with m < N is refused:
    dp-accounting has no analysis of fixed-size sampling under it. 0 rounds: 0; z = 0: infinity.
    """
    import dp_accounting
    from dp_accounting import rdp

    accounting = LEGACY_ACCOUNTING.get(accounting, accounting)
    if accounting not in CLIENT_ACCOUNTING:
        raise ValueError(f"accounting must be one of {CLIENT_ACCOUNTING}, got {accounting!r}")
    if int(num_clients) != num_clients or int(clients_per_round) != clients_per_round \
            or not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"clients per round must be a whole number in [1, clients = {num_clients}], "
                         f"got {clients_per_round}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if rounds < 0 or noise_multiplier < 0:
        raise ValueError(f"rounds and the noise multiplier must be >= 0, got {rounds} and {noise_multiplier}")
    sampled = clients_per_round < num_clients
    relation = relation or ("replace-one" if sampled else "add-or-remove-one")
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if relation == "add-or-remove-one" and sampled:
        raise ValueError(f"{clients_per_round} of {num_clients} clients per round is a sample of fixed size: its "
                         "epsilon is accounted under replace-one (dp-accounting has no add-or-remove-one analysis of "
                         "it). Use relation replace-one, or every client every round")
    if rounds == 0:
        return 0.0, relation
    if noise_multiplier == 0:
        return math.inf, relation
    neighbours = dp_accounting.NeighboringRelation

    def epsilon_of(event, neighbouring) -> float:
        accountant = rdp.RdpAccountant(neighboring_relation=neighbouring)
        accountant.compose(event, int(rounds))
        return float(accountant.get_epsilon(delta))

    absl = logging.getLogger("absl")  # it warns about fractional orders it drops; the best order is kept anyway
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        if relation == "add-or-remove-one":
            return epsilon_of(dp_accounting.GaussianDpEvent(noise_multiplier), neighbours.ADD_OR_REMOVE_ONE), relation
        per_round = dp_accounting.GaussianDpEvent(noise_multiplier / 2)  # sensitivity 2C under replace-one
        epsilon = epsilon_of(per_round, neighbours.REPLACE_ONE)
        if sampled and accounting == "sampled":
            event = dp_accounting.SampledWithoutReplacementDpEvent(int(num_clients), int(clients_per_round), per_round)
            epsilon = min(epsilon, epsilon_of(event, neighbours.REPLACE_ONE))
        return epsilon, relation
    finally:
        absl.setLevel(level)


def noise_std(noise_multiplier: float, clipping_norm: float, num_sampled_clients: int) -> float:
    """Std of the Gaussian noise added to the average of m clipped updates: z * C / m (Flower's compute_stdv)."""
    return compute_stdv(noise_multiplier, clipping_norm, num_sampled_clients)


# ---- server side -----------------------------------------------------------------------------------------------------

class ClientLevelDP(RoundStrategy, Strategy):
    """DP-FedAvg around a sampling strategy: clipping asked of the clients, uniform fixed-denominator average,
    Gaussian noise, epsilon per round (see the module docstring for the reasons it is not Flower's wrapper).

    ``strategy`` samples the clients and configures their training (``configure_train``); its own aggregation is
    not used. The server clips again (a no-op for clients that ran :func:`clipping_mod`), so a client without the
    mod cannot break the sensitivity bound. Arrays matching ``frozen_keys`` (fnmatch patterns) are never taken from
    clients: they keep the global value and need no noise.
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int,
                 num_clients: int, delta: float, per_layer: bool = False, accounting: str = "poisson",
                 frozen_keys: Iterable[str] = (), server_lr: float = 1.0, seed: int | None = 0) -> None:
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError(f"need noise_multiplier >= 0 and clipping_norm > 0, got {noise_multiplier}, {clipping_norm}")
        if not 1 <= num_sampled_clients <= num_clients:
            raise ValueError(f"num_sampled_clients must lie in [1, {num_clients}], got {num_sampled_clients}")
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.num_sampled_clients = int(num_sampled_clients)
        self.num_clients = int(num_clients)
        self.delta = float(delta)
        self.per_layer = bool(per_layer)
        self.accounting = LEGACY_ACCOUNTING.get(accounting, accounting)  # "poisson" (old name): the sampling done
        self.frozen_keys = tuple(frozen_keys)
        self.server_lr = float(server_lr)
        self.seed = seed  # None: noise from the OS's entropy (secure); an int: reproducible noise
        self.relation = self._accounted(1)[1]  # checks the settings early
        self._round_start: dict[str, np.ndarray] = {}

    @property
    def sampling_rate(self) -> float:
        return self.num_sampled_clients / self.num_clients

    def epsilon(self, rounds: int) -> float:
        """Epsilon at delta after ``rounds`` rounds, for the sampling done (m of N, see client_level_epsilon)."""
        return self._accounted(rounds)[0]

    def _accounted(self, rounds: int) -> tuple[float, str]:
        return client_level_epsilon(self.noise_multiplier, rounds, self.num_clients, self.num_sampled_clients,
                                    self.delta, self.accounting)

    def is_frozen(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.frozen_keys)

    def private_keys(self, keys: Iterable[str]) -> list[str]:
        """The arrays clients may change: every key except the frozen ones."""
        return [k for k in keys if not self.is_frozen(k)]

    def summary(self) -> None:
        log.info("ClientLevelDP: z=%g C=%g (%s clipping) m=%d of %d clients, delta=%g, %s accounting",
                 self.noise_multiplier, self.clipping_norm, "per-layer" if self.per_layer else "flat",
                 self.num_sampled_clients, self.num_clients, self.delta, self.accounting)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_start = arrays_to_numpy(arrays)
        if self.per_layer:
            num_private = len(self.private_keys(self._round_start))
            config[KEY_PER_LAYER_CLIPPING_NORM] = per_layer_norm(self.clipping_norm, num_private)
        else:
            config[KEY_CLIPPING_NORM] = self.clipping_norm
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if len(messages) != self.num_sampled_clients:
            raise RuntimeError(f"round {server_round}: {len(messages)} clients sampled, the DP noise is calibrated for "
                               f"{self.num_sampled_clients}; check clients_per_round against the connected nodes")
        return messages

    def aggregate_round(self, server_round: int, replies: Sequence[Message], *, refused: Dropped = ()) -> RoundOutcome:
        kept = list(replies)
        if not kept:
            log.warning("round %d: no usable reply, the global model is kept", server_round)
            return RoundOutcome(dropped=list(refused))
        start = self._round_start
        keys = self.private_keys(start)
        total = {k: np.zeros(start[k].shape, dtype=np.float64) for k in keys}
        received_norms = []
        for message in kept:
            trained = arrays_to_numpy(reply_arrays(message))
            update = {k: trained[k].astype(np.float64) - start[k] for k in keys}
            received_norms.append(update_norm(update))
            if self.per_layer:
                update = clip_per_layer(update, per_layer_norm(self.clipping_norm, len(keys)))
            else:
                update = clip_update(update, self.clipping_norm)
            for k in keys:
                total[k] += update[k]
        std = noise_std(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        rng = np.random.default_rng(None if self.seed is None else [int(self.seed), int(server_round)])
        new = {}
        for key, value in start.items():
            if key not in total:
                new[key] = value.copy()  # frozen: the global value, never a client's
                continue
            noisy = total[key] / self.num_sampled_clients + rng.normal(0.0, std, size=value.shape)
            updated = value.astype(np.float64) + self.server_lr * noisy
            if key.endswith("running_var"):
                updated = np.maximum(updated, VARIANCE_FLOOR)  # post-processing: a variance stays positive
            new[key] = updated.astype(value.dtype)
        tolerance = 1e-3 * self.clipping_norm  # a clipped float32 model, re-read in float64, is C within ~1e-5
        clients = [partition_of(m) for m in kept]
        return RoundOutcome(
            arrays=ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()}),
            metrics=aggregate_train_metrics([m.content for m in kept]),
            clients=clients,
            weights={c: 1.0 / self.num_sampled_clients for c in clients},  # uniform, whatever the example counts
            dropped=list(refused),
            report={  # the clipping diagnostics (metrics.jsonl columns)
                "dp_noise_std": std,
                "dp_max_update_norm": max(received_norms),
                "dp_clipped_fraction": sum(n >= self.clipping_norm - tolerance for n in received_norms) / len(kept),
            },
        )

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)

    def round_report(self, server_round: int) -> dict:
        """Columns of metrics.jsonl for a round, skipped or not: epsilon so far and delta."""
        epsilon = self.epsilon(server_round)
        return {"dp_epsilon": epsilon if math.isfinite(epsilon) else None, "dp_delta": self.delta,
                "dp_relation": self.relation}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def privacy_round_report(strategy, server_round: int) -> dict:
    """dp_epsilon and dp_delta of a round's metrics row ({} for a run without DP; the clipping diagnostics come in
    the round's RoundOutcome.report)."""
    return strategy.round_report(server_round) if isinstance(strategy, ClientLevelDP) else {}


def with_privacy(strategy: Strategy, privacy, *, num_clients: int, clients_per_round: int | None, seed: int,
                 server_lr: float = 1.0) -> Strategy:
    """``strategy`` wrapped in :class:`ClientLevelDP` when ``privacy.enabled`` (fedasr.fl.config.Privacy)."""
    if privacy is None or not privacy.enabled:
        return strategy
    per_round = num_clients if clients_per_round is None else int(clients_per_round)
    if privacy.delta >= 1.0 / num_clients:
        raise ValueError(f"privacy.delta = {privacy.delta} must be below 1 / num_clients = {1.0 / num_clients:.3g} "
                         "(a larger delta allows releasing one client's data outright); set privacy.delta smaller")
    if privacy.accounting in LEGACY_ACCOUNTING:
        log.info("privacy.accounting: %s is read as %s: the server samples exactly %d of %d clients without "
                 "replacement, and epsilon is accounted for that sampling (fedasr.fl.privacy.client_level_epsilon)",
                 privacy.accounting, LEGACY_ACCOUNTING[privacy.accounting], per_round, num_clients)
    return ClientLevelDP(
        strategy, noise_multiplier=privacy.noise_multiplier, clipping_norm=privacy.clipping_norm,
        num_sampled_clients=per_round, num_clients=num_clients, delta=privacy.delta, per_layer=privacy.per_layer,
        accounting=privacy.accounting, frozen_keys=privacy.frozen_keys, server_lr=server_lr,
        seed=None if privacy.secure_noise else seed,
    )
