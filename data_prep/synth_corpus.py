"""Synthesize the Common-Voice-shaped espeak-ng corpus: the same as `fedasr synth` (see its --help).

    python data_prep/synth_corpus.py results/demo/corpus --speakers 40 --utterances-per-speaker 20 --seed 0
"""

import sys

from fedasr.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
