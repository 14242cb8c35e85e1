"""The ground floor of the pipeline: what every other part needs and nothing of the pipeline above it.

config (the schema in schema/ and the loading: no torch, no model), the stage declarations and their
fingerprints (stage, registry), the run directory's names (layout), the run lock (lock), files that ship
with the package (resources), secrets, node names and retryable faults (node), a full disk (diskfull).
Modules here import nothing of xlp.pipeline outside core/ (tests/test_layering.py checks it).
"""
