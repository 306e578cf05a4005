"""Demo model, stage 2: continues stage 1 on the 128-px shapes set (progressive sizes, like FP-SFT).
`python -m lumina_jax.demo.recipe` sets checkpoint.init_from to the stage-1 export and the data path.
Residual dropout 0.3 in this stage: without it the decoder learns the seen colour-shape combinations by
heart and draws held-out ones in the wrong colour, and guidance does not help on them (docs/demo_recipe.md,
runs A to F; 0.2 and 0.4 were worse)."""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_stage1 import get_config as stage1_config  # noqa: E402

from lumina_jax.training.config import DataConfig, OptimizerConfig  # noqa: E402


def get_config():
    cfg = stage1_config()
    return dataclasses.replace(
        cfg, name="demo_stage2", total_steps=1800, model=cfg.model.replace(dropout=0.3),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.01, clip_grad_norm=1.0),
        data=DataConfig(seq_len=256, global_batch_size=8, packing=True),  # ~20 items of ~100 tokens per step
        checkpoint=dataclasses.replace(cfg.checkpoint, init_from="runs/demo/export/stage1"))
