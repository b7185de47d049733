"""The ASR Brain: SpeechBrain's own training loop, filled through hooks only (never a forked fit()).

Works for any YAML-defined :class:`fedasr.models.model.AcousticModel`: the Brain's only module is ``model`` and
all structure lives in the model's roles. ``hparams`` passed to the Brain:

* ``tokenizer`` (required), ``valid_search`` / ``test_search`` ("greedy" | "beam" | None: no decoding);
* optional: ``lr_annealing`` (NewBobScheduler on dev WER), ``train_logger`` (FileTrainLogger), ``epoch_average``
  (an :class:`EpochAverage`: the dev decoding, the kept checkpoints and the test see it; training goes on from the
  model's own weights),
  ``keep_checkpoints``, ``hyps_file`` (per-utterance test hypotheses), ``epoch_counter``,
  ``proximal_mu`` + ``proximal_anchor`` (FedProx: mu/2 * ||w - w_global||^2 added to the training loss; the anchor
  holds a copy of the trainable parameters received from the server, in ``named_parameters`` order).

Without a checkpointer (the federated client), ``on_fit_start`` recovers nothing: global weights stay.
"""

from __future__ import annotations

import speechbrain as sb
import torch

from fedasr.metrics.wer import error_report, utterance_row
from fedasr.models.dataio import GROUP_FIELDS
from fedasr.utils.io import atomic_write_text


def decode_batch(model, batch, tokenizer, mode: str, *, epoch: int | None = None, augment: bool = False):
    """Forward one batch and decode it; returns (ForwardOutput, hypotheses or None when mode is None)."""
    wavs, wav_lens = batch.sig
    tokens_bos = batch.tokens_bos[0] if model.has_decoder else None
    out = model(wavs, wav_lens, tokens_bos, epoch=epoch, augment=augment)
    hyps = model.transcribe(out, tokenizer, mode) if mode else None
    return out, hyps


def batch_loss(model, out, batch) -> torch.Tensor:
    tokens, token_lens = batch.tokens
    tokens_eos, tokens_eos_lens = batch.tokens_eos
    return model.loss(out, tokens, token_lens, tokens_eos, tokens_eos_lens)


def batch_rows(batch, hyps: list[str]) -> list[dict]:
    """Per-utterance error rows (ID, spk_id, gender, age, accents, ref, hyp, counts) of a decoded batch."""
    rows = []
    for i, (utt_id, ref, hyp) in enumerate(zip(batch.id, batch.wrd, hyps)):
        fields = {k: getattr(batch, k)[i] for k in GROUP_FIELDS}
        rows.append(utterance_row(utt_id, ref, hyp, **fields))
    return rows


def proximal_term(model: torch.nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * sum ||w - w_anchor||^2 over the trainable parameters (Li et al., MLSys 2020)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


@sb.utils.checkpoints.register_checkpoint_hooks
class EpochAverage:
    """Exponential moving average of a model's weights over the epochs of a centralized run (the experiment's
    ``ema_decay``: the centralized twin of the federated ``evaluation.ema_decay``, which averages the global models
    of the rounds; bench/RESULTS.md "Session 10").

    After each training epoch ``avg <- d * avg + (1 - d) * x`` (floating-point tensors; the first epoch's weights
    start it) and the model holds ``avg`` while the dev set is decoded and the checkpoint is saved, so NewBob, the
    best checkpoint, the test and the exported seed checkpoint are the average's; the next training epoch goes on
    from ``x``, which the checkpoint keeps beside the average (a resumed run goes on from ``x`` and folds its next
    epoch into the recovered average; like any SpeechBrain resume it is not bit-identical, as the augmentation's
    random state is not checkpointed)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:  # decay checked with the hparams (train.py)
        self.model, self.decay = model, float(decay)
        self.average: dict[str, torch.Tensor] | None = None
        self.training_weights: dict[str, torch.Tensor] | None = None  # x, while the model holds the average

    def show_average(self) -> None:
        """Fold the epoch's weights into the average and load the average into the model (x kept aside)."""
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.average is None:
            self.average = {k: v.clone() for k, v in weights.items() if v.is_floating_point()}
        else:
            for key, value in self.average.items():
                value.mul_(self.decay).add_(weights[key], alpha=1.0 - self.decay)
        self.training_weights = weights
        self.model.load_state_dict({**weights, **self.average})

    def restore_training_weights(self) -> None:
        if self.training_weights is not None:
            self.model.load_state_dict(self.training_weights)
            self.training_weights = None

    @sb.utils.checkpoints.mark_as_saver
    def _save(self, path) -> None:
        torch.save({"average": self.average, "training_weights": self.training_weights}, path)

    @sb.utils.checkpoints.mark_as_loader
    def _load(self, path, end_of_epoch=True) -> None:
        state = torch.load(path, map_location=next(self.model.parameters()).device)
        self.average, self.training_weights = state["average"], state["training_weights"]


class ASRBrain(sb.Brain):
    """Hooks: compute_forward, compute_objectives, on_stage_start, on_stage_end."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        search = {sb.Stage.VALID: self.hparams.valid_search, sb.Stage.TEST: self.hparams.test_search}.get(stage)
        return decode_batch(self.modules.model, batch, self.hparams.tokenizer, search,
                            epoch=self.current_epoch, augment=stage == sb.Stage.TRAIN)

    def compute_objectives(self, predictions, batch, stage):
        out, hyps = predictions
        loss = batch_loss(self.modules.model, out, batch)
        if stage == sb.Stage.TRAIN and getattr(self.hparams, "proximal_mu", 0.0):
            loss = loss + proximal_term(self.modules.model, self.hparams.proximal_anchor, self.hparams.proximal_mu)
        if hyps is not None:
            self.rows.extend(batch_rows(batch, hyps))
        return loss

    def on_stage_start(self, stage, epoch=None):
        self.current_epoch = epoch
        self.rows = []
        average = getattr(self.hparams, "epoch_average", None)
        if average is not None and stage == sb.Stage.TRAIN:
            average.restore_training_weights()  # after a dev pass or a recovered checkpoint: train on x
        elif average is not None and stage == sb.Stage.VALID:
            average.show_average()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            self.train_losses = getattr(self, "train_losses", []) + [stage_loss]
            return
        if self.rows:
            overall = error_report(self.rows, group_columns=())["overall"]
            stats.update(WER=100 * overall["wer"], CER=100 * overall["cer"])
        if stage == sb.Stage.VALID:
            self._end_of_epoch(stats, epoch)
        else:
            self._end_of_test(stats)

    def _end_of_epoch(self, stats, epoch):
        self.valid_stats = stats
        lr = self.optimizer.param_groups[0]["lr"]
        annealing = getattr(self.hparams, "lr_annealing", None)
        if annealing is not None and "WER" in stats:
            lr, new_lr = annealing(stats["WER"])
            sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
        logger = getattr(self.hparams, "train_logger", None)
        if logger is not None:
            logger.log_stats(stats_meta={"epoch": epoch, "lr": lr}, train_stats=self.train_stats, valid_stats=stats)
        if self.checkpointer is not None:  # keeps the best by dev WER (or the latest without decoding)
            has_wer = "WER" in stats
            self.checkpointer.save_and_keep_only(
                meta={"epoch": epoch, **({"WER": stats["WER"]} if has_wer else {})},
                min_keys=["WER"] if has_wer else None,
                num_to_keep=getattr(self.hparams, "keep_checkpoints", 1),
            )

    def _end_of_test(self, stats):
        self.test_stats = stats
        self.test_rows = list(self.rows)
        logger = getattr(self.hparams, "train_logger", None)
        if logger is not None:
            epoch = self.hparams.epoch_counter.current if hasattr(self.hparams, "epoch_counter") else None
            logger.log_stats(stats_meta={"Epoch loaded": epoch}, test_stats=stats)
        hyps_file = getattr(self.hparams, "hyps_file", None)
        if hyps_file and self.rows:
            atomic_write_text(hyps_file, "".join(f"{r['ID']}\t{r['ref']}\t{r['hyp']}\t{r['errors']}/{r['words']}\n"
                                                 for r in self.rows))
