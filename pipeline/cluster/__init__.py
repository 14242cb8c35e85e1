"""Running on clusters: submission (`xlp submit`, submit), Slurm checks (slurm), launch plans for the
training ranks (plan), and the launchers that start, supervise and restart them (launch)."""
