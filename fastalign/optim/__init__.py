"""Online-merging optimizers (OnDARE, OnTIES) as one fused AdamW step per launch of parameter shards."""

from fastalign.optim._layout import FlatShard
from fastalign.optim.online_merge import OnlineMergeAdamW
from fastalign.optim.reference_delta import reference_delta

__all__ = ["FlatShard", "OnlineMergeAdamW", "reference_delta"]
