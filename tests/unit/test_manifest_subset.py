"""A capped dev set (dev_max_utterances, server_wer_utterances, evaluate --max-utterances) covers every speaker."""

from __future__ import annotations

from collections import Counter

from fedasr.data.manifest import Utterance, spread_over_speakers, write_manifest
from fedasr.models.dataio import make_dataset


def grouped_by_speaker(tmp_path, speakers=6, each=20) -> list[Utterance]:
    """A manifest laid out as prepare writes one: every speaker's utterances in one block."""
    utterances = []
    for s in range(speakers):
        for i in range(each):
            wav = tmp_path / f"s{s}_{i}.mp3"
            wav.touch()
            utterances.append(Utterance(ID=f"s{s}_{i}", duration=1.0 + i / 100, wav=str(wav), spk_id=f"spk{s}",
                                        wrd="un mot"))
    return utterances


def test_a_subset_takes_utterances_from_every_speaker_in_turn(tmp_path):
    utterances = grouped_by_speaker(tmp_path)
    subset = spread_over_speakers(utterances, 30)
    assert len(subset) == 30
    assert Counter(u.spk_id for u in subset) == {f"spk{s}": 5 for s in range(6)}
    assert [u.ID for u in subset if u.spk_id == "spk0"] == [f"s0_{i}" for i in range(5)]  # each speaker's first ones
    assert subset == [u for u in utterances if u in subset]  # manifest order kept
    assert spread_over_speakers(utterances, 30) == subset  # fixed: the same subset every round and every run


def test_uneven_speakers_and_caps_beyond_the_manifest(tmp_path):
    utterances = grouped_by_speaker(tmp_path, speakers=2, each=3) + [
        Utterance(ID="solo", duration=1.0, wav="x.mp3", spk_id="spk9", wrd="un")]
    assert Counter(u.spk_id for u in spread_over_speakers(utterances, 4)) == {"spk0": 2, "spk1": 1, "spk9": 1}
    assert spread_over_speakers(utterances, 100) == utterances
    assert spread_over_speakers(utterances, 0) == []


def test_the_dataset_of_a_capped_dev_set_spans_the_speakers(tmp_path):
    manifest = tmp_path / "dev.csv"
    write_manifest(manifest, grouped_by_speaker(tmp_path))
    dataset = make_dataset(manifest, tokenizer=None, sample_rate=16000, max_utterances=12)
    assert len(dataset) == 12
    assert Counter(i.split("_")[0] for i in dataset.data_ids) == {f"s{s}": 2 for s in range(6)}
