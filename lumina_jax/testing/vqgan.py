"""A tiny random VQGAN in the real file formats, for tests that need an image tokenizer.

    cfg = tiny_vqgan_config()                                   # Chameleon layout at width 32, 64 codes
    ckpt, yaml = write_lightning_vqgan(tmp / "src", seed=0)     # vqgan.ckpt + vqgan.yaml (needs torch)
    ckpt_dir = write_vqgan_checkpoint(tmp / "vqgan", seed=0)    # converted directory (no torch needed)
    tok = ImageTokenizer.from_checkpoint(ckpt_dir)

Weights are deterministic for a seed (numpy PCG64) and scaled so that activations stay O(1) and random
images use many different codes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from lumina_jax import param_checkpoint
from lumina_jax.convert.vqgan import state_dict_from_params
from lumina_jax.image_tokenizer import CONFIG_FILE
from lumina_jax.models.vqgan import VQGANConfig, abstract_params

CODEBOOK_STD = 0.5  # about the spread of quant_conv outputs under these random weights


def tiny_vqgan_config(**overrides: Any) -> VQGANConfig:
    """Chameleon's layout (ch_mult 1,1,2,2,4, two res blocks, mid attention, x16) at width 32, 64 codes of dim 32."""
    fields = dict(embed_dim=32, n_embed=64, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
                  ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(), dropout=0.0)
    fields.update(overrides)
    return VQGANConfig(**fields)


def random_vqgan_params(config: VQGANConfig, seed: int = 0) -> dict:
    """Random float32 numpy parameters (Flax tree) with non-trivial biases and norm affines."""
    gen = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(config))
    out = []
    for kp, leaf in leaves:
        names = [k.key for k in kp]
        is_norm = any(n.startswith("norm") for n in names)
        if names[-1] == "kernel":
            x = gen.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif names[-1] == "scale":
            x = 1.0 + 0.1 * gen.standard_normal(leaf.shape)
        elif names[-1] == "embedding":
            x = CODEBOOK_STD * gen.standard_normal(leaf.shape)
        else:
            x = (0.1 if is_norm else 0.05) * gen.standard_normal(leaf.shape)
        out.append(x.astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def write_vqgan_yaml(path: str | os.PathLike, config: VQGANConfig) -> Path:
    """A taming-style vqgan.yaml (model.params with ddconfig and a lossconfig, as Meta ships it)."""
    doc = config.to_yaml_dict()
    doc["model"]["params"]["lossconfig"] = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                            "params": {"disc_start": 0, "codebook_weight": 1.0}}
    path = Path(path)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_lightning_vqgan(directory: str | os.PathLike, config: VQGANConfig | None = None, seed: int = 0,
                          with_loss_keys: bool = True) -> tuple[Path, Path]:
    """Writes `vqgan.ckpt` ({"state_dict": ..., Lightning metadata}) and `vqgan.yaml`; needs torch.

    With `with_loss_keys`, the state_dict also carries a few `loss.*` tensors as a trained VQModel does.
    Returns (ckpt path, yaml path).
    """
    import torch


    config = config or tiny_vqgan_config()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: torch.from_numpy(v) for k, v in state_dict_from_params(random_vqgan_params(config, seed), config).items()}
    if with_loss_keys:
        gen = np.random.default_rng(seed + 1)
        sd["loss.logvar"] = torch.zeros(())
        sd["loss.discriminator.main.0.weight"] = torch.from_numpy(gen.standard_normal((8, 3, 4, 4)).astype(np.float32))
        sd["loss.perceptual_loss.net.slice1.0.bias"] = torch.from_numpy(gen.standard_normal(8).astype(np.float32))
    ckpt = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
            "optimizer_states": [], "lr_schedulers": []}
    torch.save(ckpt, directory / "vqgan.ckpt")
    return directory / "vqgan.ckpt", write_vqgan_yaml(directory / "vqgan.yaml", config)


def write_vqgan_checkpoint(directory: str | os.PathLike, config: VQGANConfig | None = None, seed: int = 0,
                           overwrite: bool = False) -> Path:
    """Writes a converted VQGAN checkpoint directory (`params/` + `vqgan_config.json`) directly; no torch.

    Same weights as `write_lightning_vqgan` + `python -m lumina_jax.convert vqgan` for the same seed.
    """
    config = config or tiny_vqgan_config()
    with param_checkpoint.atomic_directory(directory, overwrite=overwrite) as tmp:
        param_checkpoint.save_params(tmp, random_vqgan_params(config, seed))
        param_checkpoint.write_json(tmp, CONFIG_FILE, config.to_dict())
    return Path(directory).absolute()
