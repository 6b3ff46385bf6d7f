"""pytest plugin (-p liger_fastalign_plugin): with FASTALIGN_LIGER=1, Liger's chunked DPO/KTO classes and
functional aliases are fastalign's (through liger_shim) before Liger's test modules import them."""

import os

if os.environ.get("FASTALIGN_LIGER") == "1":
    import importlib

    import liger_shim

    chunked = importlib.import_module("liger_kernel.chunked_loss")
    functional = importlib.import_module("liger_kernel.chunked_loss.functional")
    dpo = importlib.import_module("liger_kernel.chunked_loss.dpo_loss")
    kto = importlib.import_module("liger_kernel.chunked_loss.kto_loss")
    chunked.LigerFusedLinearDPOLoss = dpo.LigerFusedLinearDPOLoss = liger_shim.LigerFusedLinearDPOLoss
    chunked.LigerFusedLinearKTOLoss = kto.LigerFusedLinearKTOLoss = liger_shim.LigerFusedLinearKTOLoss
    dpo.LigerFusedLinearDPOFunction = liger_shim.LigerFusedLinearDPOFunction
    kto.LigerFusedLinearKTOFunction = liger_shim.LigerFusedLinearKTOFunction
    functional.liger_fused_linear_dpo = liger_shim.LigerFusedLinearDPOFunction.apply
    functional.liger_fused_linear_kto = liger_shim.LigerFusedLinearKTOFunction.apply
