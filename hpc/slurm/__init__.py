"""Everything that runs Slurm commands lives in this package."""
