"""fedasr: federated end-to-end speech recognition on Flower and SpeechBrain."""
__version__ = "0.1.0"
