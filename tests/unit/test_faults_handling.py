"""Faulty clients with mock replies and the fake system: what is refused, what a round does with too few usable
replies, when a run stops, and the reproducible fault draws of fedasr.fl.faults (the real-Flower runs are in
tests/integration/test_faults.py)."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedasr.fl import client_app
from fedasr.fl.arrays import arrays_to_numpy, numpy_to_arrayrecord, state_to_arrayrecord
from fedasr.fl.checkpoint import load_server_state
from fedasr.fl.config import FLConfigError, config_from_dict
from fedasr.fl.faults import Faults, InjectedCrash, draw_faults
from fedasr.fl.round import TooManyFailedRoundsError
from fedasr.fl.run import FederatedRun
from fedasr.fl.server_app import run_server
from fedasr.fl.strategies import build_strategy
from fedasr.fl.strategies.base import vet_and_aggregate
from fedasr.fl.strategies.replies import array_spec, missing_replies, short_error, usable_replies, why_unusable
from fl_fakes import FakeASR, FakeGrid, reply, set_task_identity

GLOBAL = {"w": np.zeros((2, 2), dtype=np.float32), "frozen": np.array([3.0, 4.0], dtype=np.float32)}


def client_reply(partition_id, arrays=None, node=None):
    arrays = {"w": np.ones((2, 2), dtype=np.float32), "frozen": GLOBAL["frozen"]} if arrays is None else arrays
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "wer": 0.3, "partition-id": partition_id,
                            "word-errors": 30, "words": 100})
    return reply(RecordDict({"arrays": numpy_to_arrayrecord(arrays), "metrics": metrics}),
                 node if node is not None else 500 + partition_id)


MISFITS = {
    "other shape": ({"w": np.ones((2, 3), dtype=np.float32), "frozen": GLOBAL["frozen"]}, "has shape (2, 3)"),
    "missing key": ({"w": np.ones((2, 2), dtype=np.float32)}, "missing keys ['frozen']"),
    "extra key": ({**GLOBAL, "head": np.ones(3, dtype=np.float32)}, "unexpected keys ['head']"),
    "integer dtype": ({"w": np.ones((2, 2), dtype=np.int64), "frozen": GLOBAL["frozen"]}, "dtype int64"),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_reply_that_does_not_fit_the_global_model_is_refused_with_its_reason(case):
    arrays, reason = MISFITS[case]
    assert reason in why_unusable(client_reply(1, arrays), array_spec(GLOBAL))
    assert why_unusable(client_reply(1, arrays)) is None  # without a spec, only finiteness is checked
    fp16 = {k: v.astype(np.float16) for k, v in GLOBAL.items()}  # a float encoding of the same model is fine
    assert why_unusable(client_reply(1, fp16), array_spec(GLOBAL)) is None


@pytest.mark.parametrize("name", ["wer-softmax", "fedavg", "fedadam", "fedavgm"])
def test_every_strategy_drops_a_wrongly_shaped_reply_and_averages_the_rest(name, monkeypatch):
    set_task_identity(monkeypatch)
    strategy = build_strategy(name, {}, num_clients=3)
    list(strategy.configure_train(1, numpy_to_arrayrecord(GLOBAL), ConfigRecord({"lr": 0.1}), FakeGrid(3, None)))
    misfit = client_reply(1, MISFITS["other shape"][0])
    outcome = vet_and_aggregate(strategy, 1, [client_reply(0), misfit, client_reply(2)])
    values = arrays_to_numpy(outcome.arrays)
    assert values["w"].shape == (2, 2) and np.isfinite(values["w"]).all() and (values["w"] > 0).all()
    assert [pid for pid, _ in outcome.dropped] == [1] and "shape" in outcome.dropped[0][1]
    assert outcome.clients == [0, 2]


def test_error_replies_are_dropped_and_missing_replies_are_named_by_node(monkeypatch):
    from flwr.app import Error

    set_task_identity(monkeypatch)
    sent = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (11, 12, 13, 14)]
    sent.append(Message(RecordDict({"config": ConfigRecord({"partition-id": 6})}), dst_node_id=15, message_type="train"))
    for index, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"ins{index}"
    crashed = reply(None, 12, "ins1", error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"))
    good = reply(client_reply(0).content, 11, "ins0")
    late_reply_of_an_earlier_round = reply(client_reply(3).content, 14, "ins-from-round-1")
    kept, dropped = usable_replies([crashed, good], array_spec(GLOBAL), sent=sent)
    assert kept == [good] and dropped == [(12, "error reply (boom)")]  # no partition known for node 12: its node id
    missing = missing_replies(sent, [crashed, good, late_reply_of_an_earlier_round], 30)
    reason = "no reply within the round deadline (round_timeout 30 s)"
    assert missing == [(13, reason), (14, reason), (6, reason)]  # node 15 was sent partition 6: named by it


def test_a_crash_reason_is_the_exception_text_not_rays_traceback():
    ray_reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
                  "  File \"client_app.py\", line 117, in train\nflwr.clientapp.client_app.ClientAppException: \n"
                  "Exception ClientAppException occurred. Message: client 1 crashed in round 2 (fault injection)'>)")
    assert short_error(ray_reason) == "client 1 crashed in round 2 (fault injection)"
    assert short_error("x" * 1000).endswith("...") and len(short_error("x" * 1000)) == 300


# ---- the server loop with failing clients (fake system, in-process grid) ----------------------------------------

def make_run(tmp_path, **config):
    settings = {"rounds": 3, "local_epochs": 1, "lr": 0.2, "batch_size": 4, "seed": 7, "system": "fl_fakes:FakeASR",
                "strategy": {"name": "wer-softmax", "temperature": 0.05}, "wer_source": "server",
                "round_timeout": 30, **config}
    return FederatedRun(config=config_from_dict(settings), seed_checkpoint="seed", partition="partition.json",
                        output_dir=str(tmp_path), dev_manifest="dev.csv", test_manifest="", num_clients=4)


def failing_grid(behaviour):
    """Clients 0-3; ``behaviour[(round, pid)]`` in {"crash", "nan", "silent", "shape"}, else they train."""
    def train(arrays, config, pid):
        fault = behaviour.get((int(config["server-round"]), pid))
        if fault == "crash":
            raise RuntimeError(f"client {pid} crashed")
        if fault == "silent":
            return None
        if fault in ("nan", "shape"):
            values = {k: np.full_like(v, np.nan) if fault == "nan" else np.ones(3, np.float32)
                      for k, v in arrays_to_numpy(arrays).items()}
            return numpy_to_arrayrecord(values), MetricRecord({"num-examples": 5, "train-loss": 1.0, "partition-id": pid})
        return client_app.train_on_partition(arrays, config, "p.json", pid)
    return FakeGrid(4, train)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_failing_clients_are_listed_per_round_and_the_round_completes_with_the_rest(tmp_path, fake_clients):
    grid = failing_grid({(1, 1): "crash", (1, 2): "nan", (1, 3): "silent", (2, 0): "shape"})
    summary = run_server(grid, make_run(tmp_path, rounds=2, min_clients=1), FakeASR())
    first, second = rows(tmp_path)[1:]
    assert summary["finished"] and not first["round_skipped"] and not second["round_skipped"]
    assert first["clients"] == [0] and second["clients"] == [1, 2, 3]
    reasons = {str(client): reason for client, reason in first["failed"]}
    assert len(first["failed"]) == 3 and reasons["2"] == "arrays hold NaN or infinity (diverged local training)"
    assert any("client 1 crashed" in r for r in reasons.values()) and any("no reply within" in r for r in reasons.values())
    assert len(second["failed"]) == 1 and second["failed"][0][0] == 0 and "has shape (3,)" in second["failed"][0][1]
    final = torch.load(tmp_path / "final_model.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_a_round_below_min_clients_keeps_the_model_and_the_lr(tmp_path, fake_clients):
    grid = failing_grid({(2, 0): "crash", (2, 1): "nan", (2, 2): "silent"})
    run_server(grid, make_run(tmp_path, rounds=3, min_clients=2, annealing={"threshold": 0.9}), FakeASR())
    history = rows(tmp_path)
    skipped = history[2]
    assert [r["round_skipped"] for r in history[1:]] == [False, True, False]
    assert skipped["clients"] == [] and len(skipped["failed"]) == 3 and "train_loss" not in skipped
    assert skipped["dev_wer"] == history[1]["dev_wer"]  # same global model as after round 1
    assert skipped["next_lr"] == skipped["lr"]  # a round that did not train does not anneal the lr


def test_consecutive_failed_rounds_stop_the_run_after_checkpointing(tmp_path, fake_clients):
    everyone_crashes = {(r, pid): "crash" for r in range(1, 6) for pid in range(4)}
    with pytest.raises(TooManyFailedRoundsError, match=r"rounds 1-2 .*min_clients=1.*--resume"):
        run_server(failing_grid(everyone_crashes), make_run(tmp_path, rounds=5, max_failed_rounds=2), FakeASR())
    assert load_server_state(tmp_path).round == 2
    assert [r["round"] for r in rows(tmp_path)] == [0, 1, 2]
    seed = FakeASR().state_dict()
    kept = load_server_state(tmp_path).arrays
    assert all(np.array_equal(kept[k], seed[k].numpy()) for k in kept)  # nothing was aggregated


def test_tolerance_settings_are_validated():
    with pytest.raises(FLConfigError, match="min_clients"):
        config_from_dict({"min_clients": 0})
    with pytest.raises(FLConfigError, match="faults.crash"):
        config_from_dict({"faults": {"crash": 1.5}})
    with pytest.raises(FLConfigError, match="slow_seconds"):
        config_from_dict({"faults": {"inject": {2: "slow"}}})
    with pytest.raises(FLConfigError, match="choose one of"):
        config_from_dict({"faults": {"inject": {2: "explode"}}})
    assert config_from_dict({"faults": {"inject": {"2": "crash"}}}).faults.inject == {2: "crash"}


# ---- fault draws and the ClientApp side -----------------------------------------------------------------------

def test_fault_draws_are_reproducible_and_match_the_probabilities():
    faults = Faults(dropout=0.2, crash=0.1, nan=0.05, slow=0.25, slow_seconds=1.0)
    draws = [draw_faults(faults, 7, r, pid) for r in range(1, 41) for pid in range(100)]
    assert draws == [draw_faults(faults, 7, r, pid) for r in range(1, 41) for pid in range(100)]
    for kind, probability in (("dropout", 0.2), ("crash", 0.1), ("nan", 0.05)):
        share = sum(kind in d for d in draws) / len(draws)
        assert abs(share - probability) < 0.02, (kind, share)
    assert all(sum(k in d for k in ("dropout", "crash", "nan")) <= 1 for d in draws)
    slow_clients = {pid for pid in range(100) if "slow" in draw_faults(faults, 7, 1, pid)}
    assert 10 < len(slow_clients) < 40  # a fixed slow tail: the same clients in every round
    assert slow_clients == {pid for pid in range(100) if "slow" in draw_faults(faults, 7, 9, pid)}
    assert draws != [draw_faults(faults, 8, r, pid) for r in range(1, 41) for pid in range(100)]
    assert draw_faults(Faults(), 7, 1, 3) == []
    assert draw_faults(Faults(inject={3: "nan"}, crash=1.0), 7, 1, 3) == ["nan"]
    assert draw_faults(Faults(inject={3: "nan"}, crash=1.0, first_round=2), 7, 1, 3) == []  # before first_round
    assert draw_faults(Faults(crash=1.0, first_round=2), 7, 2, 5) == ["crash"]


def train_message(faults: Faults) -> Message:
    config = ConfigRecord({"seed": 7001, "server-round": 1, "faults": faults.to_json(7), "partition": "p.json",
                           "system": "fl_fakes:FakeASR", "seed-checkpoint": "seed", "local-epochs": 1, "lr": 0.1,
                           "batch-size": 4})
    arrays = state_to_arrayrecord(FakeASR().state_dict())
    message = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=42, message_type="train")
    message.metadata.__dict__["_message_id"] = "ins42"
    return message


def test_the_client_app_injects_dropout_crash_and_nan(monkeypatch, fake_clients):
    context = Context(run_id=1, node_id=42, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    dropped = client_app.train(train_message(Faults(inject={3: "dropout"})), context)
    assert dropped.has_error() and dropped.error.code == ErrorCode.NODE_UNAVAILABLE
    assert dropped.metadata.reply_to_message_id == "ins42" and "client 3 dropped out in round 1" in dropped.error.reason
    with pytest.raises(InjectedCrash, match="client 3 crashed in round 1"):
        client_app.train(train_message(Faults(inject={3: "crash"})), context)
    diverged = client_app.train(train_message(Faults(inject={3: "nan"})), context)
    assert why_unusable(diverged) == "arrays hold NaN or infinity (diverged local training)"
    healthy = client_app.train(train_message(Faults(inject={1: "crash"})), context)  # another client's fault
    assert why_unusable(healthy) is None and healthy.content["metrics"]["partition-id"] == 3
