"""The sbatch template `xlp submit --to slurm` renders (pipeline.sbatch), shipped with the package."""
