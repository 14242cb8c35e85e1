"""Pure-PyTorch reference implementations of every op in `kernels`: readable, float32 internally
(float64 for float64 inputs), the oracle the Triton kernels are tested against."""
from xlp.kernels.reference.common import doc_starts_mask
from xlp.kernels.reference.cross_entropy import linear_cross_entropy
from xlp.kernels.reference.decode import decode_linear, mlstm_decode_mix
from xlp.kernels.reference.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_step
from xlp.kernels.reference.norms import layer_norm, rms_norm
from xlp.kernels.reference.slstm import slstm_sequence, slstm_step

__all__ = [
    "decode_linear",
    "doc_starts_mask",
    "layer_norm",
    "linear_cross_entropy",
    "mlstm_chunkwise",
    "mlstm_decode_mix",
    "mlstm_parallel",
    "mlstm_step",
    "rms_norm",
    "slstm_sequence",
    "slstm_step",
]
