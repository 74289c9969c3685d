"""DeltaLLM-style weight sharing inside ONE model: dependent blocks reuse an earlier anchor block's weights plus a
trained low-rank delta (W_l ≈ W_a + A_l·B_l), the deltas distilled from the original with progressive module
replacement (Mikaelyan et al. 2025, "DeltaLLM: Compress LLMs with Low-Rank Deltas between Shared Weights").

    from deltapack.share import share, load_shared, export_dense
    share("model_dir", "out/", reduction=0.12)            # plan, train, save (CLI: deltapack share)
    model, tok = load_shared("out/")                      # runs generate; anchors stored and counted once
    export_dense("out/", "dense/")                        # plain HF checkpoint transformers loads

Modules: plan (budget rule, criterion, choice), model (SharedLinear, apply/finalize), train (distillation + PMR,
checkpoints), store (save/load/export), data (offline training text), evaluate (ppl/KL), baselines (ShortGPT layer
drop, SVD init), tasks (prompt/answer items for the benchmark).
"""

from deltapack.share.baselines import block_influence, layer_drop_model, svd_init_model
from deltapack.share.model import SharedLinear, apply_plan, dense_state_dict, finalize
from deltapack.share.pipeline import share
from deltapack.share.plan import SharePlan, make_plan, unique_param_count
from deltapack.share.store import export_dense, load_shared, save_shared
from deltapack.share.train import TrainConfig, train_deltas

__all__ = [
    "SharePlan", "SharedLinear", "TrainConfig", "apply_plan", "block_influence", "dense_state_dict", "export_dense",
    "finalize", "layer_drop_model", "load_shared", "make_plan", "save_shared", "share", "svd_init_model",
    "train_deltas", "unique_param_count",
]
