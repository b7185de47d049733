"""fp16 / bf16 update encoding: round trip, bytes, frozen statistics, overflow, and the server loop end to end."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fedasr.fl import client_app
from fedasr.fl.arrays import (
    all_finite,
    arrays_to_numpy,
    decode_replies,
    decode_update,
    encode_update,
    numpy_to_arrayrecord,
)
from fedasr.fl.config import FLConfigError, config_from_dict
from fedasr.fl.run import FederatedRun
from fedasr.fl.server_app import run_server
from fl_fakes import FakeASR, FakeGrid, reply

RNG = np.random.default_rng(0)
GLOBAL = {"w": RNG.standard_normal((64, 32)).astype(np.float32), "frozen": np.linspace(-3, 3, 7).astype(np.float32)}


def client_arrays(step=1e-3):
    """A client's trained arrays: the global ones plus a small SGD-sized step, frozen statistics unchanged."""
    return {"w": GLOBAL["w"] + step * RNG.standard_normal((64, 32)).astype(np.float32), "frozen": GLOBAL["frozen"].copy()}


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


@pytest.mark.parametrize("encoding, bound", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_round_trip_keeps_the_update_to_its_precision(encoding, bound):
    sent, trained = numpy_to_arrayrecord(GLOBAL), client_arrays()
    encoded = encode_update(numpy_to_arrayrecord(trained), sent, encoding)
    decoded = arrays_to_numpy(decode_update(encoded, sent))
    update = trained["w"] - GLOBAL["w"]
    error = np.abs(decoded["w"] - trained["w"])
    # relative to the update itself (not to the weights): what a half-precision *update* promises
    assert (error <= bound * np.abs(update) + 1e-6 * np.abs(trained["w"]) + 1e-12).all()
    assert decoded["w"].dtype == np.float32
    assert np.array_equal(decoded["frozen"], GLOBAL["frozen"])  # zero update: bit-identical
    values = sum(a.size for a in GLOBAL.values())
    assert record_bytes(encoded) == 2 * values  # raw 16-bit words, no header
    assert record_bytes(numpy_to_arrayrecord(trained)) > 4 * values


def test_fp32_is_unchanged_and_an_encoded_array_cannot_be_read_as_weights():
    sent, trained = numpy_to_arrayrecord(GLOBAL), numpy_to_arrayrecord(client_arrays())
    assert encode_update(trained, sent, "fp32") is trained
    assert decode_update(trained, sent) is trained
    encoded = encode_update(trained, sent, "fp16")
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        encoded["w"].numpy()  # a strategy that skipped decoding fails loudly instead of averaging updates
    with pytest.raises(ValueError, match="update_encoding must be one of"):
        encode_update(trained, sent, "fp8")


def test_fp16_overflow_makes_the_reply_non_finite_so_it_is_dropped():
    sent = numpy_to_arrayrecord(GLOBAL)
    exploded = client_arrays()
    exploded["w"][0, 0] = 1e6
    fp16 = decode_update(encode_update(numpy_to_arrayrecord(exploded), sent, "fp16"), sent)
    bf16 = decode_update(encode_update(numpy_to_arrayrecord(exploded), sent, "bf16"), sent)
    assert not all_finite(fp16)
    assert all_finite(bf16) and arrays_to_numpy(bf16)["w"][0, 0] == pytest.approx(1e6, rel=1e-2)


def test_decode_replies_rewrites_training_replies_in_place():
    sent = numpy_to_arrayrecord(GLOBAL)
    trained = client_arrays()
    message = reply(RecordDict({"arrays": encode_update(numpy_to_arrayrecord(trained), sent, "bf16")}), 501)
    decode_replies([message], sent)
    decoded = arrays_to_numpy(message.content["arrays"])
    np.testing.assert_allclose(decoded["w"], trained["w"], atol=1e-4)


def test_update_encoding_setting_is_validated():
    assert config_from_dict({"update_encoding": "bf16"}).update_encoding == "bf16"
    with pytest.raises(FLConfigError, match="update_encoding must be one of"):
        config_from_dict({"update_encoding": "int8"})


# ---- the real server loop and ClientApp training function, with the fake ASR system (as test_fl_checkpoint) ----

def run_with(tmp_path, encoding):
    config = config_from_dict({"rounds": 2, "local_epochs": 2, "lr": 0.2, "batch_size": 4, "seed": 7,
                               "system": "fl_fakes:FakeASR", "strategy": {"name": "fedavg"}, "wer_source": "server",
                               "update_encoding": encoding})
    run = FederatedRun(config=config, seed_checkpoint="seed", partition="p.json", output_dir=str(tmp_path / encoding),
                       dev_manifest="dev.csv", test_manifest="", num_clients=4)
    grid = FakeGrid(4, lambda arrays, cfg, pid: client_app.train_on_partition(arrays, cfg, "p.json", pid))
    summary = run_server(grid, run, FakeASR())
    rows = [json.loads(line) for line in open(tmp_path / encoding / "metrics.jsonl")][1:]
    final = torch.load(tmp_path / encoding / "final_model.pt")["state_dict"]
    return summary, rows, final


def test_server_loop_with_fp16_updates_halves_the_bytes_and_trains_alike(tmp_path, fake_clients):
    _, rows32, final32 = run_with(tmp_path, "fp32")
    _, rows16, final16 = run_with(tmp_path, "fp16")
    for row32, row16 in zip(rows32, rows16):
        assert row16["bytes_sent"] == row32["bytes_sent"]  # the global model still goes out in fp32
        assert row16["bytes_received"] < 0.6 * row32["bytes_received"]
        assert row16["dev_wer"] == pytest.approx(row32["dev_wer"], abs=1e-3)
        assert row16["dropped"] == []
    assert final16["linear.weight"].dtype == torch.float32
    torch.testing.assert_close(final16["linear.weight"], final32["linear.weight"], atol=1e-3, rtol=0)
    assert torch.equal(final16["normaliser_mean"], final32["normaliser_mean"])  # frozen: exact
