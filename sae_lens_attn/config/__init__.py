"""Attention SAE configs: SAELens training configs with head metadata, and their registration."""
