"""Common Voice release folder -> train/dev/test manifests: the same as `fedasr prepare`.

    python data_prep/prepare_commonvoice.py CV_DIR OUT_DIR --lang fr [--workers N] [--min-duration S] ...

All options and the library call live in fedasr.cli (`_add_prepare`) and fedasr.data.commonvoice.
"""

import sys

from fedasr.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
