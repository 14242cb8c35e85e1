"""The config sections the pipeline's stages read, one dataclass per section (`data.*`, `train.*`, ...).

Pure Python, no torch: the config of a run is loaded and validated anywhere (a login node, a laptop).
`model.*`, `kernels.*` and `decode.*` are the model's and the kernels' own (xlp.xlstm_model.config,
xlp.kernels.config); core/config.py composes them all into one schema.
"""
