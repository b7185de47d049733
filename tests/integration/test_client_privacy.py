"""No audio or transcript leaves a client: the real ClientApp trains on a fixture silo and its reply is inspected.

What is inspected is what a SuperNode uploads: the reply Message split into Flower's content-addressed objects
(``get_all_nested_objects``, each serialized with ``deflate``, exactly as ``flower-supernode`` pushes them). The
reply must hold the model's floating-point arrays (same names and shapes as the global model it received) and a
few numbers, nothing else; its bytes must contain no transcript, no speaker id and no file path, and its size
must be the model's plus a small envelope (so nothing else could hide in it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from flwr.app import ArrayRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PARTITION_ID = 0
# Keys a client may report (fedasr.fl.strategies.replies): counts, a loss, timings and its local WER sums.
ALLOWED_METRICS = {"num-examples", "train-loss", "partition-id", "fit-seconds", "wer", "word-errors", "words"}
# Flower's framing around the arrays: object ids, per-array headers, metadata. Measured: 22.7 KB for the 46 arrays
# of ctc_tiny (about 490 B per array); the bound allows 1 KiB per array plus 8 KiB.
ENVELOPE_BYTES_PER_ARRAY, ENVELOPE_BYTES = 1024, 8 * 1024


@pytest.fixture(scope="module")
def client_reply(cross_silo_partition, central_seed_checkpoint, prepared_manifests):
    """(global arrays sent, reply Message, the bytes a SuperNode would upload) for one round of silo 0."""
    from fedasr.fl.client_app import app
    from fedasr.fl.evaluator import GlobalModelEvaluator, load_system
    from fedasr.fl.run import run_from_run_config

    run = run_from_run_config({
        "hparams": str(REPO / "hparams/fl/cross_silo.yaml"), "partition": str(cross_silo_partition),
        "seed-checkpoint": str(central_seed_checkpoint), "output-dir": "unused", "num-clients": 4,
        "dev-manifest": str(prepared_manifests / "dev.csv"),
        "overrides": json.dumps({"local_epochs": 1, "wer_source": "client"}),
    })
    sent = GlobalModelEvaluator(load_system(run)).initial_arrays()
    config = run.round_config(1, 0.05)
    config["report-wer"] = True  # the client also decodes its local validation slice: that path must not leak
    metadata = Metadata(run_id=1, message_id="from-server", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    incoming = Message(content=RecordDict({"arrays": sent, "config": config}), metadata=metadata)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": PARTITION_ID, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    reply = app(incoming, context)
    uploaded = b"".join(obj.deflate() for obj in get_all_nested_objects(reply).values())
    return sent, reply, uploaded


def client_utterances(partition: Path):
    from fedasr.data.manifest import read_manifest
    from fedasr.fl.client_app import client_for

    client = client_for(str(partition), PARTITION_ID)
    return read_manifest(client["train"]) + read_manifest(client["valid"]), client


def test_reply_holds_only_model_arrays_and_numbers(client_reply):
    sent, reply, _ = client_reply
    assert not reply.has_error()
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics"}
    assert isinstance(content["arrays"], ArrayRecord) and isinstance(content["metrics"], MetricRecord)
    assert not content.config_records  # no free-form strings at all
    returned = content["arrays"]
    assert list(returned.keys()) == list(sent.keys())
    for key, array in returned.items():
        assert array.shape == sent[key].shape and array.dtype == sent[key].dtype, key
        assert np.issubdtype(array.numpy().dtype, np.floating), key
    assert any(not np.array_equal(returned[k].numpy(), sent[k].numpy()) for k in sent)  # it did train
    metrics = dict(content["metrics"])
    assert set(metrics) <= ALLOWED_METRICS and {"num-examples", "train-loss", "wer"} <= set(metrics)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())


def test_no_array_is_shaped_like_a_clip(client_reply, cross_silo_partition):
    """No array has a dimension equal to a clip's length in samples, as stored or resampled to 16 kHz."""
    _, reply, _ = client_reply
    utterances, _ = client_utterances(cross_silo_partition)
    infos = [soundfile.info(u.wav) for u in utterances]
    clip_lengths = {info.frames for info in infos} | {round(info.frames * 16000 / info.samplerate) for info in infos}
    dims = {d for array in reply.content["arrays"].values() for d in array.shape}
    assert not dims & clip_lengths


def test_uploaded_bytes_hold_no_transcript_speaker_or_path(client_reply, cross_silo_partition):
    sent, _, uploaded = client_reply
    utterances, client = client_utterances(cross_silo_partition)
    assert utterances
    model_bytes = sum(array.numpy().nbytes for array in sent.values())
    assert model_bytes <= len(uploaded) <= model_bytes + ENVELOPE_BYTES + ENVELOPE_BYTES_PER_ARRAY * len(sent)
    secrets = {client["train"], client["valid"], str(cross_silo_partition)}
    for u in utterances:
        secrets |= {u.wrd, u.spk_id, u.wav, Path(u.wav).name, u.ID}
        secrets |= {word for word in u.wrd.split() if len(word) >= 5}  # shorter ones may occur in float bytes by chance
    found = sorted(s for s in secrets if s and s.encode("utf-8") in uploaded)
    assert not found, f"the reply carries client data: {found[:5]}"
