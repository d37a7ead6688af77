"""Developer tools: what the tests and a first try of the harness need, not what users run on
their clusters. ``python -m devtools.local_slurm start --dir DIR`` starts a real single-node
SLURM cluster (with accounting) to try the SLURM path on one machine."""
