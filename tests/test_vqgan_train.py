"""VQGAN training: straight-through quantizer, dead-code restarts, a short run lowers the loss with many codes
alive, and the CLI writes a checkpoint the image tokenizer loads, bit-identical to another run of the same config."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lumina_jax.demo import vqgan as dv
from lumina_jax.training import vqgan_train as vt

# One tiny config shared by every test (the jitted step is cached per config, so it compiles once).
TINY = dv.DemoVQGANConfig(ch=32, num_res_blocks=1, z_channels=32, embed_dim=8, n_embed=64, train_sizes="32x32",
                          batch_pixels=8 * 32 * 32, steps=40, lr=1e-3, warmup_steps=5, restart_every=10,
                          usage_decay=0.9, log_every=1, eval_target_sizes="32", eval_per_size=3, seed=0)


def test_quantize_straight_through_and_losses():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    z_st, codes, codebook, commit = vt.quantize(z, emb)
    d = ((np.asarray(z)[..., None, :] - np.asarray(emb)) ** 2).sum(-1)
    assert np.array_equal(np.asarray(codes), d.argmin(-1))
    e = np.asarray(emb)[np.asarray(codes)]
    np.testing.assert_allclose(np.asarray(z_st), e, atol=1e-6)
    np.testing.assert_allclose(float(codebook), np.mean((np.asarray(z) - e) ** 2), rtol=1e-6)
    np.testing.assert_allclose(float(commit), float(codebook), rtol=1e-6)
    w = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
    g_z = jax.grad(lambda zz: jnp.sum(vt.quantize(zz, emb)[0] * w))(z)
    np.testing.assert_allclose(np.asarray(g_z), np.asarray(w), atol=1e-6)  # identity gradient to the encoder
    assert not np.any(np.asarray(jax.grad(lambda ee: jnp.sum(vt.quantize(z, ee)[0] * w))(emb)))  # none to codes
    g_e = np.asarray(jax.grad(lambda ee: vt.quantize(z, ee)[2])(emb))
    expect = np.zeros_like(g_e)
    np.add.at(expect, np.asarray(codes).ravel(), 2 * (e - np.asarray(z)).reshape(-1, 4) / z.size)
    np.testing.assert_allclose(g_e, expect, atol=1e-6)  # codebook loss moves only the used codes, towards z
    g_commit = np.asarray(jax.grad(lambda zz: vt.quantize(zz, emb)[3])(z))
    np.testing.assert_allclose(g_commit, 2 * (np.asarray(z) - e) / z.size, atol=1e-6)


def test_ema_codebook_averages_assigned_encoder_outputs():
    rng = np.random.default_rng(2)
    n, d, decay = 6, 3, 0.9
    emb = rng.normal(size=(n, d)).astype(np.float32)
    count = np.array([0.5, 0.0, 1.0, 0.2, 0.0, 0.3], np.float32)
    total = (emb * count[:, None]).astype(np.float32)
    latents = rng.normal(size=(2, 2, 3, d)).astype(np.float32)
    codes = np.array([[[0, 0, 2], [3, 0, 2]], [[5, 5, 0], [2, 3, 0]]], np.int32)  # code 1 and 4: never chosen
    new_count, new_sum, new_emb = (np.asarray(a) for a in vt.ema_codebook(
        jnp.asarray(count), jnp.asarray(total), jnp.asarray(emb), jnp.asarray(codes), jnp.asarray(latents), decay))
    flat, idx = latents.reshape(-1, d), codes.reshape(-1)
    for i in range(n):
        chosen = flat[idx == i]
        exp_count = decay * count[i] + (1 - decay) * len(chosen)
        exp_sum = decay * total[i] + (1 - decay) * chosen.sum(0)
        assert new_count[i] == pytest.approx(exp_count, rel=1e-6)
        np.testing.assert_allclose(new_sum[i], exp_sum, rtol=1e-5, atol=1e-6)
        expect = emb[i] if exp_count == 0 else exp_sum / exp_count
        np.testing.assert_allclose(new_emb[i], expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new_emb[[1, 4]], emb[[1, 4]])  # unused codes keep their vectors
    assert np.abs(new_emb[3] - emb[3]).max() > 0.1  # a used code moves towards its encoder outputs


def test_restart_dead_codes_replaces_only_dead_rows_with_encoder_outputs():
    rng = np.random.default_rng(1)
    n = 8
    emb = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
    usage = jnp.asarray([0.2, 0.0, 0.2, 0.2, 0.2, 0.001, 0.1, 0.099], jnp.float32)
    latents = jnp.asarray(rng.normal(size=(2, 2, 2, 4)) + 10.0, jnp.float32)
    cfg = dataclasses.replace(TINY, n_embed=n, dead_fraction=0.05, restart_noise=0.01)
    new, new_usage, count = vt.restart_dead_codes(emb, usage, latents, jax.random.key(0), cfg)
    new, new_usage = np.asarray(new), np.asarray(new_usage)
    dead = [1, 5]  # usage below 0.05 / 8
    assert int(count) == 2
    keep = [i for i in range(n) if i not in dead]
    assert np.array_equal(new[keep], np.asarray(emb)[keep]) and np.array_equal(new_usage[keep], np.asarray(usage)[keep])
    flat = np.asarray(latents).reshape(-1, 4)
    for i in dead:
        assert np.abs(flat - new[i]).max(axis=1).min() < 0.06  # a batch latent plus small noise
        assert new_usage[i] == pytest.approx(1 / n)


@pytest.fixture(scope="module")
def tiny_run():
    return vt.train(TINY, functools.partial(dv.training_batch, TINY), progress=False)


def test_short_run_lowers_loss_and_keeps_codes_alive(tiny_run):
    from lumina_jax.image_tokenizer import ImageTokenizer
    from lumina_jax.models.vqgan import init_params

    params, report = tiny_run
    hist = report["history"]
    assert [h["step"] for h in hist] == list(range(1, TINY.steps + 1))
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert np.mean([h["l1"] for h in hist[-10:]]) < np.mean([h["l1"] for h in hist[:10]])
    # reconstruction error on fixed unseen batches, at the initial and at the trained parameters
    x = np.concatenate([dv.training_batch(TINY, 1000 + i) for i in range(4)])

    def l1(p):
        tok = ImageTokenizer(TINY.vqgan_config(), p)
        return float(np.abs(np.asarray(tok.decode(tok.encode(x))) - x).mean())

    before, after = l1(init_params(TINY.vqgan_config(), TINY.seed)), l1(params)
    assert after < 0.85 * before, (before, after)
    assert hist[0]["restarted"] == TINY.n_embed  # step 0 initialises every code from encoder outputs
    assert report["codes_alive_at_end"] >= TINY.n_embed // 2
    assert np.mean([h["batch_codes_used"] for h in hist[-10:]]) >= 10  # of 64 codes, in a batch of 8 x 2 x 2 latents
    assert params["quantize"]["embedding"].shape == (TINY.n_embed, TINY.embed_dim)


def test_training_batches_are_seeded_by_step():
    assert np.array_equal(dv.training_batch(TINY, 7), dv.training_batch(TINY, 7))
    assert not np.array_equal(dv.training_batch(TINY, 7), dv.training_batch(TINY, 8))
    assert not np.array_equal(dv.training_batch(TINY, 7), dv.training_batch(dataclasses.replace(TINY, seed=1), 7))


def test_training_images_exclude_held_out_combinations(monkeypatch):
    from lumina_jax.demo import shapes

    seen = []
    real = shapes.sample_spec
    monkeypatch.setattr(shapes, "sample_spec", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    cfg = dataclasses.replace(TINY, train_sizes="64x64,32x32", batch_pixels=64 * 64 * 2)
    for step in range(40):
        x = dv.training_batch(cfg, step)
        assert x.shape == ((2, 64, 64, 3) if step % 2 == 0 else (8, 32, 32, 3))
        assert x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert len(seen) == 200 and not any(s.held_out for s in seen)


def test_cli_writes_a_checkpoint_the_image_tokenizer_loads(tmp_path, tiny_run, capsys):
    from lumina_jax.image_tokenizer import ImageTokenizer

    out = tmp_path / "vq"
    flags = []
    for f in dataclasses.fields(dv.DemoVQGANConfig):
        flags += ["--" + f.name.replace("_", "-"), str(getattr(TINY, f.name))]
    assert dv.main(["--out", str(out), "--quiet", *flags]) == 0  # same config: reuses the compiled step
    printed = capsys.readouterr().out
    assert "held-out reconstructions (3 images)" in printed and str(out) in printed
    tok = ImageTokenizer.from_checkpoint(out)
    assert tok.config == TINY.vqgan_config() and tok.config.ch_mult == (1, 1, 2, 2, 4)
    report = json.loads((out / vt.REPORT_FILE).read_text())
    assert report["config"] == dataclasses.asdict(TINY)
    ev = report["heldout_eval"]
    assert ev["images"] == 3 and 1 <= ev["codes_used"] <= TINY.n_embed and np.isfinite(ev["psnr_db"])
    assert ev["analysis_accuracy_originals"]["all"] == 1.0
    assert set(ev["analysis_accuracy"]) == {"n", "background", "colour", "shape", "size", "all"}
    # a second run of the same config is bit-identical to the first (and the checkpoint holds its weights)
    assert [h["loss"] for h in report["history"]] == [h["loss"] for h in tiny_run[1]["history"]]
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(tok.params), tiny_run[0]))
    assert dv.main(["--out", str(out), "--quiet", *flags]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_cli_help_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        dv.main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(dv.DemoVQGANConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert dv.main(["--out", "/nonexistent/x", "--ch", "36"]) == 2  # not a multiple of the 8 GroupNorm groups
    err = capsys.readouterr().err.strip()
    assert "ch=36" in err and "norm_groups=8" in err and "\n" not in err
    assert dv.main(["--out", "/nonexistent/x", "--codebook-update", "kmeans"]) == 2
    assert "codebook_update='kmeans'" in capsys.readouterr().err
    assert dv.main(["--out", "/nonexistent/x", "--train-sizes", "64x40"]) == 2
    assert "64x40" in capsys.readouterr().err
