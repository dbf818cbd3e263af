"""Inference engines. Pure compute: nothing here imports hpc/, workers/ or frontend/."""
