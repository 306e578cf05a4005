"""Demo model, stage 1: the small decoder from random init on the 64-px shapes set (`python -m
lumina_jax.demo.recipe` sets the data path, the vocabulary size and the image-id range from its tokenizer).

    python train.py --config configs/demo_stage1.py output_dir=runs/demo1 data.config_path=DATA.yaml \
        model.vocab_size=1536 model.image_token_start=4 model.image_token_end=516
"""
from lumina_jax.config import ChameleonConfig
from lumina_jax.training.config import (CheckpointConfig, DataConfig, LogConfig, LossConfig, OptimizerConfig,
                                        ParallelConfig, TrainConfig)

# A 6-layer, 160-wide decoder of Lumina-7B's layout (pre-norm, q/k-norm with one shared row), fp32 for the CPU.
DEMO_MODEL = ChameleonConfig(
    vocab_size=1536, hidden_size=160, intermediate_size=448, num_layers=6, num_heads=5, num_kv_heads=5,
    head_dim=32, image_token_start=4, image_token_end=516, dropout=0.0, z_loss_weight=1e-5,
    mask_image_logits=False, param_dtype="float32", dtype="float32", remat_policy="none",
    max_position_embeddings=256)


def get_config():
    return TrainConfig(
        name="demo_stage1",
        total_steps=1200,
        seed=0,
        model=DEMO_MODEL,
        optimizer=OptimizerConfig(lr=2e-3, min_lr=2e-4, warmup_steps=30, weight_decay=0.01, clip_grad_norm=1.0),
        loss=LossConfig(chunk_size=256),
        data=DataConfig(seq_len=256, global_batch_size=8, packing=True),  # ~40 items of ~50 tokens per step
        parallel=ParallelConfig(mesh="fsdp=-1"),
        checkpoint=CheckpointConfig(save_interval_steps=250, max_to_keep=1),
        log=LogConfig(every_steps=25),
    )
