"""Prometheus scrape configuration and alert rules for the CRC-MedAI services."""
