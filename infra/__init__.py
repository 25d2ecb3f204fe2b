"""Local stack launcher (Kafka, MinIO, Redis without Docker) and container build files."""
