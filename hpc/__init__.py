"""hpc: disaggregated LLM serving on Slurm clusters."""

__version__ = "0.1.0"
