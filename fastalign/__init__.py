"""fastalign: fused Triton kernels for aligning large language models."""

from fastalign.dpo import dpo_loss, kto_loss
from fastalign.ift import ift_inputs_embeds, ift_loss
from fastalign.linear_logprobs import linear_token_logprobs, linear_token_stats
from fastalign.logprobs import TokenStats, token_logprobs, token_stats
from fastalign.losses import (
    DPOLoss,
    FusedLinearCrossEntropyLoss,
    FusedLinearDPOLoss,
    FusedLinearIFTLoss,
    FusedLinearKTOLoss,
    IFTLoss,
    KTOLoss,
)

__all__ = [
    "DPOLoss",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearDPOLoss",
    "FusedLinearIFTLoss",
    "FusedLinearKTOLoss",
    "IFTLoss",
    "KTOLoss",
    "TokenStats",
    "dpo_loss",
    "ift_inputs_embeds",
    "ift_loss",
    "kto_loss",
    "linear_token_logprobs",
    "linear_token_stats",
    "token_logprobs",
    "token_stats",
]
__version__ = "0.1.0"
