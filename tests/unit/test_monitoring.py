"""Monitoring that is right (issue 15, section 4): TensorBoard steps are rounds (federated, seed = 0) and epochs
(train-central), appended per round, never duplicated by a resumed run; each round's line once in the log; the
console of `fedasr federate` keeps fedasr's lines while everything goes to the run's log.txt."""

from __future__ import annotations

import io
import logging

import pytest

from fedasr.report import round_log
from fedasr.report.round_log import (RoundLogs, StepTensorboardLogger, round_line, tensorboard_scalars,
                                     write_round_logs)

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged events left out)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def row(n: int, dev: float, *, test: float | None = None, loss: float | None = None) -> dict:
    r = {"round": n, "lr": 0.002, "next_lr": 0.002, "dev_wer": dev, "dev_cer": dev / 2}
    if test is not None:
        r["test_wer"] = test
    if n > 0:
        r.update(train_loss=loss if loss is not None else 1.0 / n, best_dev_wer=dev, best_round=n,
                 seconds={"round": 2.5})
    return r


def test_step_is_the_round_epoch_or_loaded_epoch_and_tags_are_speechbrains():
    step, values = tensorboard_scalars({"round": 0, "lr": 0.002}, {}, {"WER": 61.0, "CER": 20.0}, {"WER": 65.0})
    assert step == 0 and values == [("lr", 0.002), ("WER/valid", 61.0), ("CER/valid", 20.0), ("WER/test", 65.0)]
    assert tensorboard_scalars({"epoch": 3, "lr": 0.5}, {"loss": 2.0})[0] == 3
    assert tensorboard_scalars({"Epoch loaded": 7}, test_stats={"WER": 9.0}) == (7, [("WER/test", 9.0)])
    assert set(dict(values)) <= set(round_log.TAGS)


def test_federated_steps_are_rounds_and_rounds_are_appended(tmp_path):
    rows = [row(0, 0.6, test=0.65)]
    with RoundLogs(tmp_path, rows, rounds=5, progress=False) as logs:
        for n, dev in ((1, 0.5), (2, 0.4)):
            rows.append(row(n, dev, test=0.45 if n == 2 else None))
            logs.write(rows)
            assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one file, appended
    got = scalars(tmp_path / "tensorboard")
    assert got["WER/valid"] == [(0, 60.0), (1, 50.0), (2, 40.0)]
    assert got["WER/test"] == [(0, 65.0), (2, 45.0)]  # the rounds that were tested, at their round
    assert [s for s, _ in got["loss/train"]] == [1, 2] and [s for s, _ in got["lr"]] == [0, 1, 2]
    assert "round" not in got  # the round is the step, not a scalar
    assert (tmp_path / "train_log.txt").read_text().count("round:") == 3


def test_resumed_run_does_not_show_a_round_twice(tmp_path):
    rows = [row(0, 0.6), row(1, 0.5), row(2, 0.4), row(3, 0.35)]
    with RoundLogs(tmp_path, rows[:1], rounds=4, progress=False) as logs:
        for n in (1, 2, 3):
            logs.write(rows[:n + 1])  # round 3's events are written, then the process dies before its checkpoint
    resumed = rows[:3]  # the checkpoint holds round 2: metrics.jsonl is truncated to rounds 0-2, round 3 is redone
    with RoundLogs(tmp_path, resumed, rounds=4, progress=False) as logs:
        for new in (row(3, 0.30), row(4, 0.25)):
            resumed.append(new)
            logs.write(resumed)
    assert scalars(tmp_path / "tensorboard")["WER/valid"] == [(0, 60.0), (1, 50.0), (2, 40.0), (3, 30.0), (4, 25.0)]
    assert (tmp_path / "train_log.txt").read_text().count("round:") == 5


def test_resumed_run_without_events_writes_the_earlier_rounds_first(tmp_path):
    rows = [row(0, 0.6), row(1, 0.5)]
    with RoundLogs(tmp_path, rows, rounds=2, progress=False) as logs:
        rows.append(row(2, 0.4))
        logs.write(rows)
    assert [s for s, _ in scalars(tmp_path / "tensorboard")["WER/valid"]] == [0, 1, 2]


def test_fresh_run_replaces_events_of_an_earlier_attempt(tmp_path):
    write_round_logs(tmp_path, [row(0, 0.9), row(1, 0.8), row(2, 0.7)])
    with RoundLogs(tmp_path, [row(0, 0.6)], rounds=2, progress=False):
        pass
    assert scalars(tmp_path / "tensorboard")["WER/valid"] == [(0, 60.0)]


def test_regenerated_logs_match_the_rows(tmp_path):
    write_round_logs(tmp_path, [row(0, 0.6, test=0.7), row(1, 0.5)])
    write_round_logs(tmp_path, [row(0, 0.6, test=0.7), row(1, 0.5), row(2, 0.4)])
    assert [s for s, _ in scalars(tmp_path / "tensorboard")["WER/valid"]] == [0, 1, 2]


def test_round_logs_log_each_round_once(tmp_path, caplog):
    rows = [row(0, 0.6, test=0.65)]
    with caplog.at_level(logging.INFO), RoundLogs(tmp_path, rows, rounds=3, progress=False) as logs:
        for n in (1, 2, 3):
            rows.append(row(n, 0.6 - n / 10))
            logs.write(rows)
            logs.announce(rows[-1])
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["round 0/3", "round 1/3", "round 2/3", "round 3/3"], lines
    assert "(seed model)" in lines[0] and "test WER 65.00 %" in lines[0]


def test_round_line():
    line = round_line({**row(2, 0.5371, loss=0.462), "next_lr": 0.001}, 5)
    assert line == "round 2/5: dev WER 53.71 % (best 53.71 % @ 2), train loss 0.462, lr 0.002 (next 0.001), 2.5 s"


def test_progress_bar_counts_rounds(tmp_path, capsys):
    rows = [row(0, 0.6), row(1, 0.5)]
    with RoundLogs(tmp_path, rows, rounds=3, progress=True) as logs:  # resumed after round 1
        assert logs.bar.n == 1 and logs.bar.total == 3
        rows.append(row(2, 0.4))
        logs.write(rows)
        logs.announce(rows[-1])
        assert logs.bar.n == 2
    assert "rounds" in capsys.readouterr().err
    assert not round_log.interactive_console()  # pytest captures stdout: no bar by default


def test_central_steps_are_epochs_and_a_resumed_run_hides_the_redone_epochs(tmp_path):
    first = StepTensorboardLogger(tmp_path)
    for epoch in (1, 2, 3):
        first.log_stats({"epoch": epoch, "lr": 1.0}, {"loss": 3.0 - epoch}, {"WER": 90.0 - epoch})
    first.close()
    resumed = StepTensorboardLogger(tmp_path)  # the checkpoint of epoch 2: epoch 3 is trained again
    for epoch in (3, 4):
        resumed.log_stats({"epoch": epoch, "lr": 0.8}, {"loss": 1.0}, {"WER": 80.0 - epoch})
    resumed.log_stats({"Epoch loaded": 4}, test_stats={"WER": 70.0})
    resumed.close()
    got = scalars(tmp_path)
    assert got["WER/valid"] == [(1, 89.0), (2, 88.0), (3, 77.0), (4, 76.0)]
    assert got["WER/test"] == [(4, 70.0)]


# ---- the console and log.txt of `fedasr federate` -----------------------------------------------------------------

@pytest.fixture
def console(monkeypatch):
    """A root logger set up as `fedasr` sets it up (basicConfig: INFO, one stderr handler)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logging.StreamHandler(io.StringIO())  # a stderr handler, read back
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers = [h for h in root.handlers if type(h) is not logging.StreamHandler] + [handler]
    root.setLevel(logging.INFO)
    yield handler
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_console_keeps_fedasrs_lines_and_the_log_file_everything(tmp_path, console):
    from flwr.common.logger import ConsoleHandler

    from fedasr.fl.simulation import LOG_FILE, federate_logging

    flower_console = io.StringIO()
    own = ConsoleHandler(stream=flower_console)
    flower = logging.getLogger("flwr")
    flower.addHandler(own)
    try:
        with federate_logging(tmp_path) as path:
            flower.debug("Registered 4 nodes")
            flower.info("configure_train: Sampled 4 nodes (out of 4)")
            flower.warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
            flower.warning("a warning the user needs")
            logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
            logging.getLogger("fedasr.report.round_log").info("round 1/2: dev WER 50.00 %")
            logging.getLogger("fedasr.fl.round").debug("detail")
            logging.getLogger("ray").error("a failure")
        flower.info("after the run")
    finally:
        flower.removeHandler(own)
    err = console.stream.getvalue()
    assert path == tmp_path / LOG_FILE
    assert err.splitlines()[:3] == ["WARNING flwr: a warning the user needs",
                                    "INFO fedasr.report.round_log: round 1/2: dev WER 50.00 %", "ERROR ray: a failure"]
    assert "INFO flwr: after the run" in err  # restored: the console is not filtered after the run
    text = path.read_text()
    for expected in ("Registered 4 nodes", "configure_train", "fraction_evaluate", "setup plugin", "round 1/2",
                     "a failure"):
        assert text.count(expected) == 1, (expected, text)
    assert "after the run" not in text
    # Flower's own console handler printed nothing during the run (its lines went through the root, once).
    assert flower_console.getvalue().count("configure_train") == 0 and "after the run" in flower_console.getvalue()
    assert logging.getLogger().handlers[-1] is console  # restored


def test_verbose_console_is_not_filtered(tmp_path, console):
    from fedasr.fl.simulation import federate_logging

    logging.getLogger().setLevel(logging.DEBUG)
    with federate_logging(tmp_path):
        logging.getLogger("flwr").debug("Registered 4 nodes")
    assert "Registered 4 nodes" in console.stream.getvalue()
