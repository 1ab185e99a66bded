"""The main job: the small MoE LM trains, checkpoints round-trip, the CLI writes its plot."""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import casts_of_w
from jax_deepgemm import train

TINY = dataclasses.replace(train.Config(), hidden=32, heads=2, layers=1, experts=4,
                           expert_width=64, seq=32, batch=8, steps=60, lr=1e-2)


def test_loss_falls_fp8_close_to_bf16():
  finals = {}
  for impl in ("fp8", "bf16"):
    _, losses, _ = train.train(TINY, impl, log_every=1000)
    assert losses[-1][1] < 0.7 * losses[0][1]
    finals[impl] = np.mean([l for _, l in losses[-5:]])
  assert abs(finals["fp8"] - finals["bf16"]) / finals["bf16"] < 0.02


def test_tokens_per_second_leaves_out_the_compiling_step(monkeypatch, capsys, tmp_path):
  # (The time ran from before the first step, whose compilation took seconds: on CPU a
  # 3-step run reported a third of the tokens/s of a 5-step one.) A first step that takes
  # 2 s, as a compilation does: the steps after it are timed alone.
  calls = []
  def step(model, optimizer, tokens, micro_batches=1):
    calls.append(1)
    time.sleep(2.0 if len(calls) == 1 else 0.0)
    return jnp.float32(1.0)
  monkeypatch.setattr(train, "train_step", step)
  _, losses, secs = train.train(dataclasses.replace(TINY, steps=3), "fp8", log_every=1000)
  assert len(losses) == 3 and secs < 1.0, secs
  assert train.train(dataclasses.replace(TINY, steps=1), "fp8")[2] is None
  train.main(["--experts", "fp8", "--steps", "1", "--plot", str(tmp_path / "c.png")])
  assert "tokens/s" not in capsys.readouterr().out  # (nothing timed after the first step)


@pytest.mark.parametrize("impl", ["fp8", "bf16"])
def test_micro_batches_average_the_micro_batch_gradients(impl):
  # 3 micro-batches of 2 rows (rows j, j + 3 in micro-batch j): the loss and gradients are the
  # mean of the three micro-batches' own, each as a plain step computes them.
  cfg = dataclasses.replace(TINY, batch=6)
  model = train.make_model(cfg, impl)
  tokens = jnp.asarray(train.MarkovLanguage(cfg.vocab).batch(6, cfg.seq + 1))
  grads = nnx.jit(train.micro_batch_grads, static_argnums=2)
  ce, g = grads(model, tokens, 3)
  parts = [grads(model, tokens[j::3], 1) for j in range(3)]
  want_ce, want_g = jax.tree.map(lambda *p: sum(p) / 3, *parts)
  np.testing.assert_allclose(ce, want_ce, rtol=1e-6)
  assert jax.tree.structure(g) == jax.tree.structure(want_g)

  def worst(a, b):  # the largest difference of a leaf, relative to that leaf's largest entry
    return max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert worst(g, want_g) < 1e-5
  # Not a plain step's (each micro-batch has its own load-balancing loss and routing).
  assert worst(grads(model, tokens, 1)[1], want_g) > 1e-3
  # FP8: the experts' weights are cast once per step, outside the micro-batch scan.
  graphdef, state = nnx.split(model)
  step = lambda state, tokens: train.micro_batch_grads(nnx.merge(graphdef, state), tokens, 3)
  casts = 2 * cfg.layers if impl == "fp8" else 0  # w_gate_up, w_down: one dual cast each
  assert casts_of_w(step, state, tokens) == casts
  assert casts_of_w(step, state, tokens, under="scan") == 0


def test_micro_batches_train_and_reject_uneven_batches(tmp_path, capsys):
  cfg = dataclasses.replace(TINY, micro_batches=2, steps=3)
  _, losses, _ = train.train(cfg, "fp8", log_every=1000)
  assert len(losses) == 3 and all(np.isfinite(l) for _, l in losses)
  with pytest.raises(ValueError, match=r"batch \(8\) must split into micro_batches \(3\)"):
    train.train(dataclasses.replace(TINY, micro_batches=3), "fp8")
  with pytest.raises(SystemExit):
    train.main(["--micro-batches", "3", "--steps", "1", "--plot", str(tmp_path / "c.png")])
  assert "--micro-batches: the batch (16) must split into micro_batches (3)" in \
      capsys.readouterr().err


def test_checkpoint_round_trip(tmp_path):
  a = train.make_model(TINY, "fp8", seed=0)
  train.save_checkpoint(a, tmp_path / "ckpt")
  b = train.restore_checkpoint(train.make_model(TINY, "fp8", seed=1), tmp_path / "ckpt")
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  tokens = jnp.asarray(train.MarkovLanguage(TINY.vocab).batch(2, 16))
  np.testing.assert_array_equal(np.asarray(a(tokens)[0]), np.asarray(b(tokens)[0]))


def test_cli_writes_plot(tmp_path, capsys):
  png = tmp_path / "loss.png"
  train.main(["--experts", "fp8", "--steps", "3", "--plot", str(png)])
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "final loss" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--steps", "-3"], ["--log-every", "0"],
                                   ["--cpu-devices", "0"], ["--cpu-devices", "-2"],
                                   ["--micro-batches", "0"]])
def test_cli_rejects_step_counts_below_one(flags, capsys):
  # (--steps 0 ran the preset's count; -3 crashed after training with an IndexError;
  # --cpu-devices 0 or -2 was ignored: the run went on with JAX's default device count.)
  with pytest.raises(SystemExit):
    train.main(["--experts", "fp8", *flags])
  assert "must be at least 1" in capsys.readouterr().err


def test_mesh_flag():
  # (Multi-device runs: tests/test_expert_parallel.py and tests/test_distributed.py.)
  assert dict(train.parse_mesh("auto", TINY).shape) == {"data": 1, "expert": 1}
  assert dict(train.parse_mesh("expert=1", TINY).shape) == {"data": 1, "expert": 1}
  with pytest.raises(ValueError, match="expected 'auto' or 'data=D,expert=E'"):
    train.parse_mesh("data=1;expert=1", TINY)
  with pytest.raises(ValueError, match="must equal the number of devices"):
    train.parse_mesh("data=2,expert=2", TINY)


def test_checkpoint_never_deletes_other_files(tmp_path, capsys):
  # (orbax's save replaced the directory: --ckpt-dir . deleted the working directory's files.)
  other = tmp_path / "mine"
  other.mkdir()
  (other / "notes.txt").write_text("keep")
  with pytest.raises(SystemExit):
    train.main(["--experts", "fp8", "--steps", "1", "--ckpt-dir", str(other),
                "--plot", str(tmp_path / "c.png")])
  assert "not an orbax checkpoint" in capsys.readouterr().err
  with pytest.raises(ValueError, match="not an orbax checkpoint"):
    train.save_checkpoint(train.make_model(TINY, "fp8"), other)
  assert (other / "notes.txt").read_text() == "keep"
  # A new directory, then the same one again (an earlier checkpoint is replaced).
  model = train.make_model(TINY, "fp8")
  train.save_checkpoint(model, tmp_path / "ck")
  train.save_checkpoint(model, tmp_path / "ck")


@pytest.mark.parametrize("flags,msg", [
    (["--plot", "/nonexistent_dir_jdg/c.png"], "does not exist"),
    (["--mesh", "foo=2"], "expected 'auto'"),
    (["--plot", "."], "names a directory"),  # (IsADirectoryError after training)
    (["--restore", "/nonexistent_dir_jdg/ck"], "--restore"),  # (orbax's FileNotFoundError)
    (["--restore", "EMPTY"], "is not a checkpoint"),  # (orbax's pytree structure error)
    (["--plot", ""], "name the PNG file"),  # (FileNotFoundError after training)
    (["--plot", "/nonexistent_dir_jdg/"], "name the PNG file"),  # (IsADirectoryError, likewise)
    (["--mesh", ""], "expected 'auto'"),  # (was: no mesh, silently)
])
def test_cli_rejects_bad_paths_and_meshes_before_training(flags, msg, capsys, tmp_path):
  # (A bad --plot directory failed after training, before the checkpoint was written.)
  flags = [str(tmp_path) if f == "EMPTY" else f for f in flags]  # an existing, empty directory
  with pytest.raises(SystemExit):
    train.main(["--experts", "fp8", "--steps", "1", *flags])
  err = capsys.readouterr()
  assert msg in err.err and "final loss" not in err.out


@pytest.mark.parametrize("sizes", [dict(data=-1), dict(expert=0), dict(data=1.0), dict(expert=True)])
def test_make_mesh_rejects_sizes_that_are_not_positive_ints(sizes):
  # (data=-1 passed the product check on 8 devices: 8 // -1 * -1 == 8.)
  from jax_deepgemm import expert_parallel
  with pytest.raises(ValueError, match="must be a positive int"):
    expert_parallel.make_mesh(**sizes)


def test_cli_rejects_a_mesh_the_batch_does_not_split_over(tmp_path):
  # (3 devices and the batch of 16: train's ValueError came as a traceback after the model
  # was built; now a usage error.) A child process: the device count is fixed at JAX's start.
  import subprocess
  import sys
  import multidevice
  r = subprocess.run([sys.executable, "-m", "jax_deepgemm.train", "--experts", "bf16", "--steps",
                      "1", "--cpu-devices", "3", "--parallel", "--plot", str(tmp_path / "c.png")],
                     env=multidevice.env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "batch (16) must split evenly over the mesh's 3 devices" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "final loss" not in r.stdout


def test_cli_rejects_an_expert_axis_the_experts_do_not_split_over(tmp_path):
  # (16 devices on the expert axis, the cpu preset's 8 experts: MoE's ValueError came as a
  # traceback after the mesh was built; now a usage error.) A child process, as above.
  import subprocess
  import sys
  import multidevice
  r = subprocess.run([sys.executable, "-m", "jax_deepgemm.train", "--experts", "fp8", "--steps",
                      "1", "--cpu-devices", "16", "--mesh", "expert=16",
                      "--plot", str(tmp_path / "c.png")],
                     env=multidevice.env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "the 8 experts must split evenly over the expert axis (16)" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and "final loss" not in r.stdout
