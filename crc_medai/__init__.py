"""CRC-MedAI: shared runtime (settings, Kafka, object store, logging) and the command line."""

__version__ = "0.1.0"
