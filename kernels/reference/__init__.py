"""Pure-PyTorch reference implementations of every op in `kernels`: readable, float32 internally
(float64 for float64 inputs), the oracle the Triton kernels are tested against."""
from kernels.reference.common import doc_starts_mask
from kernels.reference.cross_entropy import linear_cross_entropy
from kernels.reference.decode import decode_linear, mlstm_decode_mix
from kernels.reference.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_step
from kernels.reference.norms import layer_norm, rms_norm
from kernels.reference.slstm import slstm_sequence, slstm_step

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
