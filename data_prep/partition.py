"""Split a train manifest into a warm-up set and federated clients: the same as `fedasr partition` (see --help).

    python data_prep/partition.py results/demo/manifests results/demo/partitions/cross-silo --mode cross-silo
"""

import sys

from fedasr.cli import main

if __name__ == "__main__":
    sys.exit(main(["partition", *sys.argv[1:]]))
