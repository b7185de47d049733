"""A small Common-Voice-shaped corpus spoken by espeak-ng voices: the demo and test corpus of fedasr.

The output has the exact layout of a Common Voice release of one locale::

    out_dir/clips/common_voice_<lang>_<n>.mp3     48 kHz mono MP3 (written with soundfile)
    out_dir/train.tsv dev.tsv test.tsv validated.tsv

with the current Common Voice header (:data:`TSV_COLUMNS`). One speaker is one espeak-ng voice: a base voice of
the language (its accent), a variant (m1..m7, f1..f5: its gender), a pitch and a speed, all drawn from the seed.
Speakers are disjoint across train/dev/test (about 70/15/15 %, or ``eval_speakers`` each for dev and test), as in
Common Voice; dev and test speakers may read fewer clips each (``eval_utterances_per_speaker``), so a test set of
the same size spans more voices and its WER depends less on which few speakers it holds. Sentences come from the
template grammar in ``fedasr/data/sentences/<lang>.txt``; a pool of sentences is shared by the speakers, so one
sentence is read by several speakers and a dev/test sentence may also be read in train (Common Voice allows
this too; the speakers never overlap).

Acoustic variety (off by default: the default corpus is byte-identical to earlier versions): each speaker gets,
drawn from the seed, a white-noise level in ``noise_db_range`` (dBFS), a speed-perturbation factor in
``speed_range`` (the audio resampled as in Kaldi's speed perturbation: tempo and pitch change together) and a room
whose reverberation time RT60 lies in ``reverb_rt60_range`` (seconds; the clip is convolved with an exponentially
decaying noise impulse response, 0 = no room). ``acoustics="hard"`` sets all three at once (:data:`ACOUSTIC_PRESETS`);
a range given explicitly overrides the preset's.

Everything is deterministic for a seed: two runs give identical TSVs and identical MP3 bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf

from fedasr.utils.device import usable_cores
from fedasr.utils.io import atomic_open, atomic_write_json, done_marker, is_done, mark_done, read_json

log = logging.getLogger(__name__)

TSV_COLUMNS = (
    "client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
    "age", "gender", "accents", "variant", "locale", "segment",
)
SAMPLE_RATE = 48_000
ESPEAK_RATE = 22_050
DEFAULT_SPEAKERS = 40
DEFAULT_UTTERANCES_PER_SPEAKER = 20
MIN_WORDS, MAX_WORDS = 3, 8
SPLIT_FRACTIONS = {"dev": 0.15, "test": 0.15}  # the rest is train
SENTENCE_READINGS = 3  # average number of speakers reading one sentence of the pool
FIRST_CLIP_NUMBER = 20_000_000
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
PITCH_RANGE = (25, 75)
SPEED_RANGE = (125, 185)  # words per minute: intelligible
AGES = ("teens", "twenties", "thirties", "fourties", "fifties", "sixties")  # Common Voice spelling
STAGE = "synth"
SYNTH_VERSION = 1

# Per-speaker acoustic conditions, each a (low, high) range drawn uniformly per speaker.
#   noise_db:  white noise level in dBFS (speech peaks at -6 to -1 dBFS; its RMS over active frames measured
#              -15 to -21 dBFS: "hard" is an SNR of about 5 to 25 dB, "clean" 25 to 45 dB)
#   speed:     speed-perturbation factor (1.1 = 10 % faster and higher, as in Kaldi's speed perturbation)
#   rt60:      reverberation time in seconds (0 = dry, 0.3 = small room, 0.8 = large hall)
ACOUSTIC_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "clean": {"noise_db": (-60.0, -45.0), "speed": (1.0, 1.0), "rt60": (0.0, 0.0)},  # the default corpus
    "hard": {"noise_db": (-40.0, -25.0), "speed": (0.85, 1.15), "rt60": (0.2, 0.8)},
}
DEFAULT_ACOUSTICS = "clean"
NOISE_DB_LIMITS = (-120.0, 0.0)
SPEED_LIMITS = (0.5, 2.0)
RT60_LIMITS = (0.0, 3.0)
SPEED_STEP = 100  # speed factors are rounded to 1/SPEED_STEP: resampling by SPEED_STEP / round(factor * SPEED_STEP)
REVERB_DIRECT_DB = 6.0  # direct path this much above the reverberant tail's energy (a talker near the microphone)

# Base espeak-ng voice of each language -> the accent label written in the TSV, with its drawing weight.
ACCENT_VOICES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "fr": (
        ("fr-fr", "Français de France", 0.6),
        ("fr-be", "Français de Belgique", 0.2),
        ("fr-ch", "Français de Suisse", 0.2),
    ),
    "en": (
        ("en-us", "United States English", 0.5),
        ("en-gb", "England English", 0.3),
        ("en-gb-scotland", "Scottish English", 0.2),
    ),
}
SUPPORTED_LANGUAGES = tuple(sorted(ACCENT_VOICES))

_SLOT = re.compile(r"\{([A-Z_]+)\}")
_WORD = re.compile(r"[^\W_]")  # a token counts as a word when it holds a letter or digit
_FIRST_LETTER = re.compile(r"[^\W\d_]")


class SynthError(ValueError):
    """Bad arguments or a folder that cannot receive the corpus; the message says what to change."""


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed on a sentence."""


@dataclass(frozen=True)
class Grammar:
    classes: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Speaker:
    index: int
    client_id: str
    split: str
    voice: str  # espeak-ng -v argument, e.g. "fr-be+f2"
    pitch: int
    speed: int
    gain: float
    noise_db: float  # white noise level relative to full scale
    gender: str
    age: str
    accent: str
    speed_factor: float = 1.0  # speed perturbation by resampling (1.0: none)
    rt60: float = 0.0  # reverberation time of the speaker's room in seconds (0.0: dry)


@dataclass(frozen=True)
class Acoustics:
    """Per-speaker acoustic ranges of a corpus; :func:`resolve_acoustics` builds one from the user's options."""

    noise_db_range: tuple[float, float] = ACOUSTIC_PRESETS["clean"]["noise_db"]
    speed_range: tuple[float, float] = ACOUSTIC_PRESETS["clean"]["speed"]
    reverb_rt60_range: tuple[float, float] = ACOUSTIC_PRESETS["clean"]["rt60"]

    @property
    def is_default(self) -> bool:
        return self == Acoustics()

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "noise_db_range": list(self.noise_db_range),
            "speed_range": list(self.speed_range),
            "reverb_rt60_range": list(self.reverb_rt60_range),
        }


@dataclass(frozen=True)
class ClipJob:
    path: Path
    text: str
    speaker: Speaker
    noise_seed: tuple[int, ...]


# ---------------------------------------------------------------------------------------------- sentences


def load_grammar(lang: str) -> Grammar:
    """Parse ``fedasr/data/sentences/<lang>.txt`` (format in the file's header)."""
    if lang not in SUPPORTED_LANGUAGES:
        raise SynthError(f"no sentence material for language {lang!r}; choose one of {list(SUPPORTED_LANGUAGES)}")
    source = resources.files("fedasr.data").joinpath("sentences", f"{lang}.txt")
    classes: dict[str, tuple[str, ...]] = {}
    templates: list[str] = []
    for line_no, raw in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("="):
            name, _, alternatives = line[1:].partition(":")
            classes[name.strip()] = tuple(a.strip() for a in alternatives.split("|") if a.strip())
        elif line.startswith(">"):
            templates.append(line[1:].strip())
        else:
            raise SynthError(f"{source}, line {line_no}: expected '= NAME: a | b' or '> template', got {raw!r}")
    for template in templates:
        for name in _SLOT.findall(template):
            if name not in classes:
                raise SynthError(f"{source}: template {template!r} uses unknown word class {name!r}")
    return Grammar(classes=classes, templates=tuple(templates))


def count_words(sentence: str) -> int:
    """Words of a sentence: whitespace tokens holding at least one letter (punctuation marks do not count)."""
    return sum(1 for token in sentence.split() if _WORD.search(token))


def fill_template(template: str, grammar: Grammar, rng: random.Random) -> str:
    """One sentence from a template, its first letter capitalised as in Common Voice."""
    text = _SLOT.sub(lambda m: rng.choice(grammar.classes[m.group(1)]), template)
    return _FIRST_LETTER.sub(lambda m: m.group(0).upper(), text, count=1)


def sentence_pool(grammar: Grammar, size: int, seed: int) -> list[str]:
    """``size`` distinct sentences of 3 to 8 words (fewer if the grammar cannot make that many)."""
    rng = random.Random(f"fedasr-synth:{seed}:sentences")
    pool: dict[str, None] = {}
    misses = 0  # draws in a row that gave nothing new: the grammar is exhausted when they pile up
    while len(pool) < size and misses < 10_000:
        sentence = fill_template(rng.choice(grammar.templates), grammar, rng)
        if MIN_WORDS <= count_words(sentence) <= MAX_WORDS and sentence not in pool:
            pool[sentence] = None
            misses = 0
        else:
            misses += 1
    return list(pool)


# ---------------------------------------------------------------------------------------------- speakers


def split_sizes(n_speakers: int, eval_speakers: int | None = None) -> dict[str, int]:
    """Speakers per split: about 15 % dev, 15 % test (at least one each), or ``eval_speakers`` each; the rest train."""
    if n_speakers < 3:
        raise SynthError(f"speakers={n_speakers}: need at least 3 speakers (one each for train, dev and test)")
    if eval_speakers is not None:
        if eval_speakers < 1 or n_speakers - 2 * eval_speakers < 1:
            raise SynthError(f"eval_speakers={eval_speakers}: dev and test take that many speakers each, so it must "
                             f"lie in [1, {(n_speakers - 1) // 2}] with speakers={n_speakers} (at least one train "
                             "speaker); ask for more speakers or fewer eval_speakers")
        return {"train": n_speakers - 2 * eval_speakers, "dev": eval_speakers, "test": eval_speakers}
    dev = max(1, round(SPLIT_FRACTIONS["dev"] * n_speakers))
    test = max(1, round(SPLIT_FRACTIONS["test"] * n_speakers))
    return {"train": n_speakers - dev - test, "dev": dev, "test": test}


def make_speakers(lang: str, n_speakers: int, seed: int, acoustics: Acoustics | None = None,
                  eval_speakers: int | None = None) -> list[Speaker]:
    """Draw the speakers' voices and metadata from the seed; splits are assigned over a seeded shuffle.

    ``acoustics`` (default: the clean corpus) gives the ranges of the per-speaker noise level, speed factor and RT60.
    The noise level takes the same draw whatever its range, and the speed factor and RT60 come from a stream of
    their own, so the voices, ages and accents of a seed do not depend on the acoustic options.
    """
    acoustics = acoustics or Acoustics()
    noise_low, noise_high = acoustics.noise_db_range
    sizes = split_sizes(n_speakers, eval_speakers)
    order = list(range(n_speakers))
    random.Random(f"fedasr-synth:{seed}:splits").shuffle(order)
    ranked_splits = ["train"] * sizes["train"] + ["dev"] * sizes["dev"] + ["test"] * sizes["test"]
    split_of = {index: split for index, split in zip(order, ranked_splits)}
    variants = random.Random(f"fedasr-synth:{seed}:variants").sample(VARIANTS, len(VARIANTS))
    accents = ACCENT_VOICES[lang]
    speakers = []
    for index in range(n_speakers):
        rng = random.Random(f"fedasr-synth:{seed}:speaker:{index}")
        room_rng = random.Random(f"fedasr-synth:{seed}:acoustics:{index}")
        variant = variants[index % len(variants)]
        base_voice, accent, _ = rng.choices(accents, weights=[a[2] for a in accents])[0]
        speakers.append(
            Speaker(
                index=index,
                client_id=hashlib.sha512(f"fedasr-synth:{lang}:{seed}:{index}".encode()).hexdigest(),
                split=split_of[index],
                voice=f"{base_voice}+{variant}",
                pitch=rng.randint(*PITCH_RANGE),
                speed=rng.randint(*SPEED_RANGE),
                gain=round(rng.uniform(0.5, 0.9), 3),
                noise_db=round(noise_low + (noise_high - noise_low) * rng.random(), 1),  # = rng.uniform(low, high)
                gender="male_masculine" if variant.startswith("m") else "female_feminine",
                age=rng.choice(AGES),
                accent=accent,
                speed_factor=round(room_rng.uniform(*acoustics.speed_range) * SPEED_STEP) / SPEED_STEP,
                rt60=round(room_rng.uniform(*acoustics.reverb_rt60_range), 2),
            )
        )
    return speakers


# ---------------------------------------------------------------------------------------------- audio


def espeak_waveform(text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    """Run espeak-ng once; returns float32 samples at :data:`ESPEAK_RATE`."""
    command = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", text]
    try:
        done = subprocess.run(command, capture_output=True, check=True, timeout=60)
    except FileNotFoundError:
        raise EspeakError(
            "espeak-ng not found on PATH. Install it (Debian/Ubuntu: apt-get install espeak-ng)."
        ) from None
    except subprocess.CalledProcessError as err:
        reason = err.stderr.decode(errors="replace").strip()
        raise EspeakError(f"espeak-ng failed on {text!r} with voice {voice}: {reason}") from None
    samples, rate = sf.read(io.BytesIO(done.stdout), dtype="float32")
    if rate != ESPEAK_RATE:
        raise EspeakError(f"espeak-ng wrote {rate} Hz audio; expected {ESPEAK_RATE} Hz")
    return samples if samples.ndim == 1 else samples.mean(axis=1)


def to_48k(samples: np.ndarray) -> np.ndarray:
    from scipy.signal import resample_poly  # scipy comes with speechbrain

    ratio = math.gcd(SAMPLE_RATE, ESPEAK_RATE)
    # float64: in float32 the filter's decaying tails over espeak's exact-zero silences become denormal numbers,
    # which made this step 10-30 times slower.
    resampled = resample_poly(samples.astype(np.float64), SAMPLE_RATE // ratio, ESPEAK_RATE // ratio)
    return resampled.astype(np.float32)


def speed_perturb(samples: np.ndarray, factor: float) -> np.ndarray:
    """Play ``samples`` ``factor`` times faster (tempo and pitch), by resampling; factor rounded to 1/SPEED_STEP."""
    from scipy.signal import resample_poly

    step = int(round(factor * SPEED_STEP))
    if step == SPEED_STEP:
        return samples
    ratio = math.gcd(SPEED_STEP, step)
    return resample_poly(samples.astype(np.float64), SPEED_STEP // ratio, step // ratio).astype(np.float32)


def room_impulse_response(rt60: float, seed: tuple[int, ...], rate: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room: a direct-path impulse, then Gaussian noise decaying by 60 dB over ``rt60`` seconds.

    The tail starts 2.5 ms after the direct path (the first reflections) and lasts ``rt60`` seconds; its energy is
    :data:`REVERB_DIRECT_DB` below the direct path's. ``rt60 <= 0`` gives a single unit impulse (a dry signal).
    """
    if rt60 <= 0:
        return np.ones(1, dtype=np.float64)
    rng = np.random.default_rng(seed)
    gap = int(0.0025 * rate)
    t = np.arange(int(rt60 * rate)) / rate
    tail = rng.standard_normal(t.size) * np.exp(-3.0 * math.log(10.0) * t / rt60)  # amplitude -60 dB at t = rt60
    tail *= math.sqrt(10 ** (-REVERB_DIRECT_DB / 10) / float(np.sum(tail**2)))
    response = np.zeros(gap + t.size)
    response[0] = 1.0
    response[gap:] = tail
    return response


def reverberate(samples: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Full linear convolution (the reverberant tail lengthens the clip) by FFT, numpy only."""
    if response.size == 1:
        return samples
    n = samples.size + response.size - 1
    size = 1 << (n - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(samples.astype(np.float64), size) * np.fft.rfft(response, size), size)[:n]
    return wet.astype(np.float32)


def render_clip(job: ClipJob) -> float:
    """Speak, resample, apply the speaker's speed factor, room, gain and noise, write the MP3 atomically; returns
    seconds of audio."""
    spk = job.speaker
    speech = to_48k(espeak_waveform(job.text, spk.voice, spk.pitch, spk.speed))
    if spk.speed_factor != 1.0:
        speech = speed_perturb(speech, spk.speed_factor)
    if spk.rt60 > 0:
        # One room per speaker: the response depends on the seed and speaker, not on the clip.
        speech = reverberate(speech, room_impulse_response(spk.rt60, (job.noise_seed[0], spk.index, 1_000_003)))
    peak = float(np.max(np.abs(speech))) or 1.0
    rng = np.random.default_rng(job.noise_seed)
    lead = np.zeros(int(rng.uniform(0.05, 0.25) * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate([lead, speech * (spk.gain / peak)])
    audio += rng.standard_normal(audio.shape[0]).astype(np.float32) * np.float32(10 ** (spk.noise_db / 20))
    np.clip(audio, -1.0, 1.0, out=audio)
    with atomic_open(job.path, "wb") as handle:
        sf.write(handle, audio, SAMPLE_RATE, format="MP3")
    return audio.shape[0] / SAMPLE_RATE


# ---------------------------------------------------------------------------------------------- corpus


def clip_name(lang: str, number: int) -> str:
    return f"common_voice_{lang}_{number}.mp3"


def plan_clips(out_dir: Path, lang: str, speakers: list[Speaker], per_speaker: int, seed: int,
               eval_per_speaker: int | None = None) -> list[ClipJob]:
    """Which speaker reads which sentence into which file (deterministic for the seed). Train speakers read
    ``per_speaker`` clips, dev and test speakers ``eval_per_speaker`` (None: as many); clips are numbered in
    speaker order."""
    counts = [eval_per_speaker if eval_per_speaker is not None and spk.split != "train" else per_speaker
              for spk in speakers]
    grammar = load_grammar(lang)
    wanted = max(max(counts), math.ceil(sum(counts) / SENTENCE_READINGS))
    pool = sentence_pool(grammar, wanted, seed)
    if len(pool) < max(counts):
        raise SynthError(
            f"utterances_per_speaker={max(counts)}: the {lang} grammar yields only {len(pool)} distinct sentences; "
            "ask for fewer utterances per speaker"
        )
    jobs = []
    first = FIRST_CLIP_NUMBER
    for spk, count in zip(speakers, counts):
        rng = random.Random(f"fedasr-synth:{seed}:reads:{spk.index}")
        for k, text in enumerate(rng.sample(pool, count)):
            jobs.append(ClipJob(out_dir / "clips" / clip_name(lang, first + k), text, spk, (seed, spk.index, k)))
        first += count
    return jobs


def tsv_row(job: ClipJob, lang: str) -> dict[str, str]:
    spk = job.speaker
    return {
        "client_id": spk.client_id,
        "path": job.path.name,
        "sentence_id": hashlib.sha256(job.text.encode("utf-8")).hexdigest(),
        "sentence": job.text,
        "sentence_domain": "",
        "up_votes": "2",
        "down_votes": "0",
        "age": spk.age,
        "gender": spk.gender,
        "accents": spk.accent,
        "variant": "",
        "locale": lang,
        "segment": "",
    }


def write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    """Common Voice TSV: tab-separated, no quoting (sentences hold no tabs or newlines)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\t".join(TSV_COLUMNS) + "\n")
        for row in rows:
            handle.write("\t".join(row[c] for c in TSV_COLUMNS) + "\n")


def render_all(jobs: list[ClipJob], workers: int) -> list[float]:
    """Render every clip; threads suffice because espeak-ng runs as a subprocess and libsndfile releases the GIL."""
    if workers <= 1:
        return [render_clip(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(render_clip, jobs))


_RANGE_OPTIONS = {
    # option name -> (preset key, allowed limits, unit, CLI flag)
    "noise_db_range": ("noise_db", NOISE_DB_LIMITS, "dBFS", "--noise-db-range"),
    "speed_range": ("speed", SPEED_LIMITS, "x", "--speed-range"),
    "reverb_rt60_range": ("rt60", RT60_LIMITS, "s", "--reverb-rt60-range"),
}


def _as_range(name: str, value, limits: tuple[float, float], unit: str, flag: str) -> tuple[float, float]:
    example = {"noise_db_range": "-40 -25", "speed_range": "0.9 1.1", "reverb_rt60_range": "0.2 0.8"}[name]
    fix = f"give two numbers LOW HIGH in [{limits[0]:g}, {limits[1]:g}] {unit}, e.g. {flag} {example}"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise SynthError(f"{name}={value!r}: {fix}")
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SynthError(f"{name}={value!r}: {fix}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise SynthError(f"{name}={value!r}: the low end must not exceed the high end; {fix}")
    if low < limits[0] or high > limits[1]:
        raise SynthError(f"{name}={value!r}: out of range; {fix}")
    return low, high


def resolve_acoustics(
    acoustics: str = DEFAULT_ACOUSTICS,
    *,
    noise_db_range=None,
    speed_range=None,
    reverb_rt60_range=None,
) -> Acoustics:
    """The preset ``acoustics`` (:data:`ACOUSTIC_PRESETS`), with any range given explicitly replacing the preset's."""
    if acoustics not in ACOUSTIC_PRESETS:
        raise SynthError(
            f"acoustics={acoustics!r}: choose one of {list(ACOUSTIC_PRESETS)} (--acoustics clean|hard), "
            "or set the ranges one by one (--noise-db-range, --speed-range, --reverb-rt60-range)"
        )
    given = {"noise_db_range": noise_db_range, "speed_range": speed_range, "reverb_rt60_range": reverb_rt60_range}
    ranges = {}
    for name, value in given.items():
        key, limits, unit, flag = _RANGE_OPTIONS[name]
        ranges[name] = _as_range(name, ACOUSTIC_PRESETS[acoustics][key] if value is None else value, limits, unit, flag)
    return Acoustics(**ranges)


def _check_arguments(lang: str, speakers: int, per_speaker: int, workers: int, eval_speakers: int | None,
                     eval_per_speaker: int | None) -> None:
    if lang not in SUPPORTED_LANGUAGES:
        raise SynthError(f"lang={lang!r}: no sentence material; choose one of {list(SUPPORTED_LANGUAGES)}")
    if per_speaker < 1:
        raise SynthError(f"utterances_per_speaker={per_speaker}: must be at least 1")
    if eval_per_speaker is not None and eval_per_speaker < 1:
        raise SynthError(f"eval_utterances_per_speaker={eval_per_speaker}: must be at least 1 (or unset: as train)")
    split_sizes(speakers, eval_speakers)
    if workers < 1:
        raise SynthError(f"workers={workers}: must be at least 1")
    if shutil.which("espeak-ng") is None:
        raise EspeakError("espeak-ng not found on PATH. Install it (Debian/Ubuntu: apt-get install espeak-ng).")


def synthesize_corpus(
    out_dir: str | os.PathLike,
    *,
    lang: str = "fr",
    speakers: int | None = None,
    utterances_per_speaker: int | None = None,
    eval_speakers: int | None = None,
    eval_utterances_per_speaker: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    acoustics: str = DEFAULT_ACOUSTICS,
    noise_db_range: tuple[float, float] | list[float] | None = None,
    speed_range: tuple[float, float] | list[float] | None = None,
    reverb_rt60_range: tuple[float, float] | list[float] | None = None,
) -> dict:
    """Write a Common-Voice-shaped corpus to ``out_dir``; returns a summary dict.

    ``eval_speakers``: speakers in dev and in test each (default: about 15 % of ``speakers`` each);
    ``eval_utterances_per_speaker``: clips each dev and test speaker reads (default: ``utterances_per_speaker``).

    Acoustic variety, per speaker (see the module docstring): ``acoustics`` is a preset, "clean" (default: light
    noise, no speed change, no room) or "hard"; ``noise_db_range`` (dBFS, e.g. (-40, -25)), ``speed_range`` (factor,
    e.g. (0.9, 1.1)) and ``reverb_rt60_range`` (seconds, e.g. (0.2, 0.8); (0, 0) = no reverberation) replace the
    preset's range when given.

    Summary keys: lang, seed, speakers, clips, hours, splits ({split: {"speakers", "clips", "hours"}}),
    sentences (distinct), acoustics (only when not the clean default: the ranges used), seconds (wall time of this
    call), skipped (True when the folder was already complete).
    Re-running with the same arguments on a finished folder does nothing; a folder finished with other arguments
    is an error (choose another folder or delete it).

    >>> synthesize_corpus("corpus_hard", speakers=120, acoustics="hard")["splits"]["train"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    out = Path(out_dir)
    speakers = DEFAULT_SPEAKERS if speakers is None else int(speakers)
    per_speaker = DEFAULT_UTTERANCES_PER_SPEAKER if utterances_per_speaker is None else int(utterances_per_speaker)
    workers = usable_cores() if workers is None else int(workers)
    conditions = resolve_acoustics(
        acoustics, noise_db_range=noise_db_range, speed_range=speed_range, reverb_rt60_range=reverb_rt60_range
    )
    eval_speakers = None if eval_speakers is None else int(eval_speakers)
    eval_per_speaker = None if eval_utterances_per_speaker is None else int(eval_utterances_per_speaker)
    _check_arguments(lang, speakers, per_speaker, workers, eval_speakers, eval_per_speaker)
    fingerprint = {
        "version": SYNTH_VERSION, "lang": lang, "speakers": speakers, "utterances_per_speaker": per_speaker, "seed": seed,
    }
    for key, value in (("eval_speakers", eval_speakers), ("eval_utterances_per_speaker", eval_per_speaker)):
        if value is not None:  # unset: earlier corpora keep their fingerprint
            fingerprint[key] = value
    if not conditions.is_default:  # the clean corpus keeps its earlier fingerprint: finished folders stay finished
        fingerprint["acoustics"] = conditions.as_dict()
    summary_file = out / "synth_summary.json"
    if is_done(out, STAGE, fingerprint) and summary_file.exists():
        log.info("%s already holds this corpus; nothing to do", out)
        return {**read_json(summary_file), "seconds": round(time.perf_counter() - started, 3), "skipped": True}
    _refuse_other_corpus(out, fingerprint)

    speaker_list = make_speakers(lang, speakers, seed, conditions, eval_speakers)
    jobs = plan_clips(out, lang, speaker_list, per_speaker, seed, eval_per_speaker)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    log.info("synthesizing %d clips of %d speakers with %d workers -> %s", len(jobs), speakers, workers, out)
    if not conditions.is_default:
        log.info("acoustics per speaker: %s", conditions.as_dict())
    durations = render_all(jobs, workers)

    rows_by_split: dict[str, list[dict[str, str]]] = {"train": [], "dev": [], "test": []}
    for job in jobs:
        rows_by_split[job.speaker.split].append(tsv_row(job, lang))
    for split, rows in rows_by_split.items():
        write_tsv(out / f"{split}.tsv", rows)
    write_tsv(out / "validated.tsv", [tsv_row(job, lang) for job in jobs])

    summary = _summary(lang, seed, jobs, durations)
    if not conditions.is_default:
        summary["acoustics"] = conditions.as_dict()
    atomic_write_json(summary_file, summary)
    mark_done(out, STAGE, fingerprint)
    return {**summary, "seconds": round(time.perf_counter() - started, 3), "skipped": False}


def _refuse_other_corpus(out: Path, fingerprint: dict) -> None:
    marker = done_marker(out, STAGE)
    if marker.exists():
        raise SynthError(
            f"{out} already holds a synthetic corpus made with other settings (see {marker}; wanted {fingerprint}). "
            "Choose another folder or delete this one."
        )


def _summary(lang: str, seed: int, jobs: list[ClipJob], durations: list[float]) -> dict:
    splits = {}
    for split in ("train", "dev", "test"):
        picked = [(job, d) for job, d in zip(jobs, durations) if job.speaker.split == split]
        splits[split] = {
            "speakers": len({job.speaker.index for job, _ in picked}),
            "clips": len(picked),
            "hours": round(sum(d for _, d in picked) / 3600, 4),
        }
    return {
        "lang": lang,
        "seed": seed,
        "speakers": len({job.speaker.index for job in jobs}),
        "clips": len(jobs),
        "hours": round(sum(durations) / 3600, 4),
        "sentences": len({job.text for job in jobs}),
        "splits": splits,
    }
