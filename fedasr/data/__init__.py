"""Data: Common Voice preparation, text normalisation, speaker partitioning, synthetic corpus."""
