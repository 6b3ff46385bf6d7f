# ---- fastalign harness (appended by fastalign's tests/peer_suites/run_trl.sh) ----
import os as _os

if _os.environ.get("FASTALIGN_TRAINERS") == "1":
    import trl as _trl

    from fastalign.integrations import DPOTrainer as _FastalignDPOTrainer
    from fastalign.integrations import KTOTrainer as _FastalignKTOTrainer

    # The test modules run `from trl import DPOTrainer` after this conftest: they get fastalign's subclasses.
    _trl.DPOTrainer = _FastalignDPOTrainer
    _trl.KTOTrainer = _FastalignKTOTrainer
