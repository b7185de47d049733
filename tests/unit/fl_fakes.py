"""A tiny fake ASRSystem and a fake Flower Grid for logic tests of fedasr.fl (no SpeechBrain, no Ray).

The fake system is a small torch module with a BatchNorm (float running stats + an int64 num_batches_tracked
buffer) and a frozen float buffer standing in for the normaliser statistics; its "WER" is a deterministic
function of the weights (distance to a target), so training towards the target lowers it.
"""

from __future__ import annotations

import hashlib
import time

import torch
from flwr.app import Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode

from fedasr.models.api import EvalResult, FitResult

TARGET = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)
        self.register_buffer("normaliser_mean", torch.arange(4, dtype=torch.float32))


def manifest_seed(manifest: str) -> int:
    return int(hashlib.sha1(str(manifest).encode()).hexdigest()[:8], 16)


class FakeASR:
    """Implements the ASRSystem protocol with deterministic arithmetic."""

    instances = 0

    def __init__(self) -> None:
        FakeASR.instances += 1
        torch.manual_seed(0)
        self.net = TinyNet()

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, overrides=None, device="cpu"):
        return cls()

    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state)

    def fit(self, manifest, *, epochs, lr, batch_size, seed, proximal_mu=0.0, optimizer="sgd", momentum=0.0):
        gen = torch.Generator().manual_seed(manifest_seed(manifest) ^ seed)
        opt = torch.optim.SGD(self.net.linear.parameters(), lr=lr, momentum=momentum)
        self.net.train()
        loss = torch.tensor(0.0)
        for _ in range(epochs):
            x = torch.randn(batch_size, 4, generator=gen)
            self.net.norm(self.net.linear(x))  # updates BatchNorm running stats and num_batches_tracked
            noise = 0.05 * torch.randn(3, 4, generator=gen)
            loss = ((self.net.linear.weight - TARGET - noise) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return FitResult(train_loss=float(loss), num_examples=10 + manifest_seed(manifest) % 7, seconds=0.0)

    def wer(self) -> float:
        distance = float(((self.net.linear.weight.detach() - TARGET) ** 2).sum())
        return distance / (1.0 + distance)

    def evaluate(self, manifest, *, decoding="greedy", max_utterances=None, per_utterance=False):
        wer = self.wer()
        words = 1000
        return EvalResult(wer=wer, cer=wer / 2, word_errors=round(wer * words), words=words, num_utterances=10)


def reply(content: RecordDict | None, node_id: int, reply_to: str = "", error: Error | None = None) -> Message:
    """A reply Message as the server receives it, built without a running Flower (metadata set directly);
    ``error``: an error reply instead of content (what Flower returns for a ClientApp that raised)."""
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                        reply_to_message_id=reply_to, group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type="train")
    if error is not None:
        return Message(metadata=metadata, error=error)
    return Message(content=content, metadata=metadata)


class FakeGrid:
    """Stands in for Flower's Grid: runs the real client training function in-process for each message.

    Like Flower's grids it stamps each sent message with an id that its reply refers to. ``train_fn`` may raise
    (the reply is an error reply, as Flower makes for a ClientApp that raised) or return None (no reply: a
    client that missed the round deadline).
    """

    def __init__(self, num_nodes: int, train_fn) -> None:
        self.node_to_partition = {1000 + 7 * i: i for i in range(num_nodes)}
        self.train_fn = train_fn  # (arrays, config, partition_id) -> (ArrayRecord, MetricRecord)
        self.rounds_sent: list[list[int]] = []

    def get_node_ids(self):
        return list(reversed(list(self.node_to_partition)))

    def send_and_receive(self, messages, timeout=None):
        replies, sent = [], []
        for message in messages:
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"ins-{len(self.rounds_sent)}-{node}"
            # Like the ClientApp: the partition the server assigned (simulation), else the node's own.
            partition = int(message.content["config"].get("partition-id", self.node_to_partition[node]))
            sent.append(partition)
            try:
                outcome = self.train_fn(message.content["arrays"], message.content["config"], partition)
            except Exception as err:  # noqa: BLE001 - every client failure becomes an error reply, as in Flower
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err)}:<'{err}'>")
                replies.append(reply(None, node, message.metadata.message_id, error=error))
                continue
            if outcome is None:
                continue
            arrays, metrics = outcome
            replies.append(reply(RecordDict({"arrays": arrays, "metrics": metrics}), node, message.metadata.message_id))
        self.rounds_sent.append(sorted(sent))
        return replies


def set_task_identity(monkeypatch) -> None:
    """Flower stamps new Messages with the running task's identity; give tests one (restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class InProcessGrid:
    """SecAgg+ in one process (tests, bench/secure_aggregation_bench.py): routes each message to its node's client
    chain (secure_aggregation_mod -> Flower's secaggplus_mod -> weighted_update_reply) with the node's own Context,
    as a Grid and a SuperNode would; an exception becomes an error reply, as Flower makes of a failing ClientApp.
    ``contexts``: node id -> Context holding the update (see fedasr.fl.secure.keep_update). Messages get Flower's
    task identity from the caller (see set_task_identity)."""

    def __init__(self, contexts) -> None:
        self.contexts = contexts

    def deliver(self, message: Message) -> Message:
        from fedasr.fl.secure import secure_aggregation_mod, weighted_update_reply

        return secure_aggregation_mod(message, self.contexts[message.metadata.dst_node_id], weighted_update_reply)

    def send_and_receive(self, messages, timeout=None):
        import copy

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            message = copy.deepcopy(message)  # a transport delivers each node its own copy (the mod edits it)
            try:
                answer = self.deliver(message)
            except Exception as err:  # noqa: BLE001 - any ClientApp failure is an error reply
                answer = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            answer.metadata.__dict__["_src_node_id"] = node  # Flower's transport stamps the sender
            replies.append(answer)
        return replies
