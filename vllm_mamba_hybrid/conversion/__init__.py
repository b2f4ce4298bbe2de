"""Checkpoint conversions: teacher import, attention->Mamba initialisation, paper format."""
