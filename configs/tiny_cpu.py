"""A tiny model on synthetic (or a small pre-tokenized) data that trains on a laptop CPU in a minute.

    python train.py --config configs/tiny_cpu.py output_dir=runs/tiny
    python train.py --config configs/tiny_cpu.py output_dir=runs/tiny data.config_path=data.yaml
"""
from lumina_jax.config import model_preset
from lumina_jax.training.config import (CheckpointConfig, DataConfig, LogConfig, LossConfig, OptimizerConfig,
                                        ParallelConfig, TrainConfig)


def get_config():
    return TrainConfig(
        name="tiny_cpu",
        total_steps=300,
        seed=0,
        model=model_preset("tiny", dropout=0.0, z_loss_weight=1e-5, mask_image_logits=False),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.1, clip_grad_norm=4.0),
        loss=LossConfig(chunk_size=64),
        data=DataConfig(seq_len=64, global_batch_size=8, pad_multiple=64),
        parallel=ParallelConfig(mesh="fsdp=-1"),
        checkpoint=CheckpointConfig(save_interval_steps=50, max_to_keep=2),
        log=LogConfig(every_steps=10),
    )
