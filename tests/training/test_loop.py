import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from brainvq.checkpoint import load_checkpoint
from brainvq.config import TrainConfig, VQVAEConfig
from brainvq.errors import ConfigError, TrainingError
from brainvq.models.vqvae import VQVAE
from brainvq.run import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE
from brainvq.runtime import compile_enabled, prepare_module, seed_everything
from brainvq.training import loop
from brainvq.training.loop import MAX_BAD_STEPS, forward_backward, new_optimizer, train
from brainvq.training.vqvae import VQVAETask

REPO = Path(__file__).resolve().parents[2]
SMALL = VQVAEConfig(image_size=32, channels=16, residual_channels=8, code_dim=8, codebook_size=16,
                    restart_after_steps=2)


def blob_images(count: int, size: int = 32, seed: int = 0) -> TensorDataset:
    """Bright discs of random size and position on black: a stand-in for brain slices."""
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.arange(size).float()
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    centres = torch.rand(count, 2, generator=generator) * size * 0.5 + size * 0.25
    radii = torch.rand(count, generator=generator) * size * 0.2 + size * 0.1
    distance = ((y - centres[:, 0, None, None]) ** 2 + (x - centres[:, 1, None, None]) ** 2).sqrt()
    images = (distance < radii[:, None, None]).float() * 0.8
    return TensorDataset(images.unsqueeze(1), torch.arange(count) % 32)


def run(run_dir, epochs, *, resume=False, precision="bf16", train_set=None, progress=False, model_config=SMALL,
        **options):
    config = TrainConfig(epochs=epochs, batch_size=4, lr=2e-3, warmup_steps=3, precision=precision,
                         **({"max_minutes": None, "seed": 7} | options))
    seed_everything(config.seed)
    model = prepare_module(VQVAE(model_config), torch.device("cpu"), precision)
    task = VQVAETask(model, blob_images(8, seed=1), precision=precision, val_images=8)
    train_set = blob_images(24) if train_set is None else train_set
    return train(task, train_set, run_dir, config, torch.device("cpu"), resume=resume, progress=progress)


def with_nan_images(dataset: TensorDataset, indices) -> TensorDataset:
    """`dataset` with every pixel of the images at `indices` set to NaN (a corrupt or diverged input)."""
    images = dataset.tensors[0].clone()
    images[list(indices)] = math.nan
    return TensorDataset(images, dataset.tensors[1])


def without_timing(history):
    return [{key: value for key, value in record.items()
             if key not in ("images_per_second", "epoch_seconds", "elapsed_seconds")} for record in history]


class Killed(Exception):
    """Stands for a kill: the process dies right after a checkpoint is written."""


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_interrupted_then_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one(tmp_path, precision,
                                                                                    monkeypatch):
    straight = run(tmp_path / "straight", 3, precision=precision)

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise Killed

    save = loop._save
    monkeypatch.setattr(loop, "_save", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path / "interrupted", 3, precision=precision)
    monkeypatch.undo()
    resumed = run(tmp_path / "interrupted", 3, resume=True, precision=precision)

    assert without_timing(resumed) == without_timing(straight)
    final_straight, _ = load_checkpoint(tmp_path / "straight" / LAST_CHECKPOINT)
    final_resumed, _ = load_checkpoint(tmp_path / "interrupted" / LAST_CHECKPOINT)
    assert final_straight.keys() == final_resumed.keys()
    for name in final_straight:
        assert torch.equal(final_straight[name], final_resumed[name]), name


def test_metrics_jsonl_has_each_epoch_once_with_the_promised_fields(tmp_path):
    run(tmp_path, 2)
    run(tmp_path, 3, resume=True)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]
    for record in records:
        assert {"loss", "reconstruction", "codebook", "commitment", "codebook_used", "perplexity"} <= set(
            record["train"])
        assert {"ssim", "ssim_brain", "psnr", "codebook_used", "perplexity"} <= set(record["val"])
        assert record["images_per_second"] > 0
        assert 1 <= record["train"]["codebook_used"] <= SMALL.codebook_size


def test_training_reduces_the_loss_and_keeps_the_best_checkpoint(tmp_path):
    history = run(tmp_path, 4)
    assert history[-1]["train"]["reconstruction"] < history[0]["train"]["reconstruction"]
    _, best = load_checkpoint(tmp_path / BEST_CHECKPOINT)
    assert best["val"]["ssim"] == max(record["val"]["ssim"] for record in history)


def test_max_steps_ends_training_with_a_partial_epoch(tmp_path):
    history = run(tmp_path, 5, max_steps=8)  # 6 steps per epoch
    assert [record["step"] for record in history] == [6, 8]
    assert history[-1]["partial"] is True
    assert not math.isnan(history[-1]["val"]["ssim"])


def test_the_learning_rate_warms_up_holds_then_falls_towards_0_at_the_end_of_the_run(tmp_path):
    # 4 epochs of 6 steps, warm-up 3 steps, the last half cooling down; each record has its epoch's last rate.
    history = run(tmp_path, 4, cooldown=0.5)
    last_steps = [6 * epoch - 1 for epoch in (1, 2, 3, 4)]
    expected = [2e-3 * min(1.0, (1 - step / 24) / 0.5) for step in last_steps]
    assert [record["lr"] for record in history] == pytest.approx(expected)
    assert expected[2] < 2e-3 and expected[3] < 0.1 * 2e-3  # the comparison covers the cool-down


def test_the_share_of_a_run_done_is_that_of_its_nearest_limit():
    config = TrainConfig(epochs=10, max_steps=100, max_minutes=2.0)
    assert loop._share_done(config, step=10, seconds=0.0, steps_per_epoch=50) == pytest.approx(0.1)  # max_steps
    assert loop._share_done(config, step=10, seconds=90.0, steps_per_epoch=50) == pytest.approx(0.75)  # minutes
    assert loop._share_done(config, step=10, seconds=0.0, steps_per_epoch=2) == pytest.approx(0.5)  # epochs
    assert loop._share_done(config, step=10, seconds=600.0, steps_per_epoch=50) == 1.0


def test_a_constant_rate_run_keeps_its_rate_to_the_end(tmp_path):
    assert [record["lr"] for record in run(tmp_path, 2, cooldown=0.0)] == [2e-3, 2e-3]


def test_resuming_a_run_killed_before_its_first_checkpoint_starts_it_from_the_beginning(tmp_path):
    fresh = run(tmp_path / "fresh", 2)
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)
    stale = tmp_path / "killed" / "checkpoints" / ".last.safetensors.abc123.tmp"  # a write cut short by the kill
    stale.write_bytes(b"half a checkpoint")
    resumed = run(tmp_path / "killed", 2, resume=True)
    assert without_timing(resumed) == without_timing(fresh)
    assert not stale.exists()


def test_a_non_finite_step_is_skipped_undone_and_logged_and_training_goes_on(tmp_path, capsys):
    # One NaN image poisons its batch's loss and, through the EMA update in the forward pass, the codebook:
    # unless the step's buffer updates are undone too, every later step would be NaN as well.
    history = run(tmp_path, 2, train_set=with_nan_images(blob_images(24), [5]), progress=True)
    assert [record["skipped_steps"] for record in history] == [1, 1]  # the NaN batch comes once per epoch
    assert [record["step"] for record in history] == [5, 10]  # 6 batches per epoch, 5 of them used
    assert "non-finite loss" in capsys.readouterr().err
    tensors, _ = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values() if tensor.is_floating_point())
    assert history[-1]["val"]["ssim"] > 0


def test_a_skipped_step_undoes_a_dead_code_restart_of_a_codebook_learnt_by_gradients(tmp_path):
    # --no-ema: the codebook is a parameter, and a restart in the NaN batch's forward pass copies NaN encoder
    # outputs into it. Restoring buffers alone would leave them there and make every later step NaN too.
    config = dataclasses.replace(SMALL, ema=False, restart_after_steps=1)  # a restart on every step
    history = run(tmp_path, 2, train_set=with_nan_images(blob_images(24), [5]), model_config=config)
    assert [record["skipped_steps"] for record in history] == [1, 1]
    tensors, _ = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert torch.isfinite(tensors["model.quantizer.codebook"]).all()


def test_training_says_what_will_stop_it_and_when_there_is_nothing_left_to_do(tmp_path, capsys):
    run(tmp_path, 1, max_minutes=30.0)
    announced = capsys.readouterr().err
    assert "training: epochs 1..1, at most 30 minutes of training in all" in announced
    assert "--max-minutes 0 lifts the limit" in announced
    history = run(tmp_path, 1, resume=True)
    assert len(history) == 1
    assert "nothing to train: the run has done 1 epochs and --epochs is 1" in capsys.readouterr().err


def test_repeated_non_finite_losses_stop_the_run_and_leave_the_last_checkpoint_intact(tmp_path):
    from brainvq.errors import TrainingError

    run(tmp_path, 1)
    saved = {name: (tmp_path / name).read_bytes() for name in (LAST_CHECKPOINT, BEST_CHECKPOINT, METRICS_FILE)}
    with pytest.raises(TrainingError, match=f"not finite in {MAX_BAD_STEPS} steps in a row"):
        run(tmp_path, 5, resume=True, train_set=with_nan_images(blob_images(24), range(24)))
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved


def test_the_optimizer_is_fused_on_the_cpu_and_takes_the_same_steps_as_the_per_tensor_adamw():
    config = TrainConfig(lr=1e-2, weight_decay=0.1)
    weights = {name: VQVAE(SMALL) for name in ("fused", "per_tensor")}
    weights["per_tensor"].load_state_dict(weights["fused"].state_dict())
    fused = new_optimizer(weights["fused"], config, torch.device("cpu"))
    per_tensor = torch.optim.AdamW(weights["per_tensor"].parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] and fused.defaults["lr"] == 1e-2 and fused.defaults["weight_decay"] == 0.1
    before = [parameter.detach().clone() for parameter in weights["fused"].parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        gradients = [torch.randn(p.shape, generator=generator) for p in weights["fused"].parameters()]
        for optimizer, model in ((fused, weights["fused"]), (per_tensor, weights["per_tensor"])):
            for parameter, gradient in zip(model.parameters(), gradients, strict=True):
                parameter.grad = gradient.clone()
            optimizer.step()
    moved = [(after - start).abs().max() for after, start in zip(weights["fused"].parameters(), before, strict=True)]
    assert min(moved) > 1e-3  # the steps did something ...
    for a, b in zip(weights["fused"].parameters(), weights["per_tensor"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # ... and the same thing


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_clipping_is_reported():

    model = prepare_module(VQVAE(SMALL), torch.device("cpu"), "fp32").eval()  # eval: the codebook stays put
    task = VQVAETask(model, blob_images(8, seed=1), precision="fp32", val_images=8)
    optimizer = torch.optim.AdamW(model.parameters())
    batch = blob_images(4).tensors
    norms = {}
    for limit in (None, 1e-3):
        _, reported = forward_backward(task, batch, optimizer, TrainConfig(precision="fp32", max_grad_norm=limit))
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        norms[limit] = (reported, float(after))
    unclipped, _ = norms[None]
    assert unclipped > 1e-2 and norms[None][1] == pytest.approx(unclipped, rel=1e-5)
    assert norms[1e-3][0] == pytest.approx(unclipped, rel=1e-3)  # reported before clipping
    assert norms[1e-3][1] == pytest.approx(1e-3, rel=1e-3)  # applied


def test_a_full_disk_during_a_checkpoint_write_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path):
    """A real write failure from the kernel: a file-size limit (RLIMIT_FSIZE) below the checkpoint's size makes
    write() fail with EFBIG, as a full disk fails with ENOSPC (Python ignores SIGXFSZ)."""
    run(tmp_path, 1)
    before = (tmp_path / LAST_CHECKPOINT).read_bytes()
    script = (f"import resource, sys; sys.path[:0] = {sys.path!r}\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, resource.RLIM_INFINITY))\n"
              f"from tests.training.test_loop import run\n"
              f"run({str(tmp_path)!r}, 2, resume=True)\n")
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert finished.returncode != 0
    assert "OutputError" in finished.stderr and "cannot write (File too large)" in finished.stderr
    assert (tmp_path / LAST_CHECKPOINT).read_bytes() == before
    assert not [path for path in (tmp_path / "checkpoints").iterdir() if path.name.endswith(".tmp")]


def test_a_read_only_output_folder_is_a_clear_error_naming_the_file(tmp_path, monkeypatch):
    """chmod cannot stop root (CI runs as root), so the file system's refusal is simulated where it happens."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    from brainvq.errors import OutputError

    with pytest.raises(OutputError, match=r"safetensors: cannot write \(Read-only file system\); nothing was written"):
        run(tmp_path, 1)


def test_compile_auto_means_cuda_only():
    assert not compile_enabled("auto", torch.device("cpu")) and compile_enabled("auto", torch.device("cuda"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda"))
    # A network whose shapes change between steps (a windowed prior) is not compiled, and refuses to be.
    assert not compile_enabled("auto", torch.device("cuda"), static_shapes=False)
    with pytest.raises(ConfigError, match="--no-windowed"):
        compile_enabled("on", torch.device("cpu"), static_shapes=False)


def test_a_compiled_network_gives_the_same_loss_and_gradients_as_the_eager_one():
    seed_everything(0)
    model = VQVAE(SMALL)
    batch = next(iter(torch.utils.data.DataLoader(blob_images(4), batch_size=4)))
    gradients = []
    for network in (model, torch.compile(model)):
        task = VQVAETask(model, blob_images(4), precision="fp32")
        task.network = network
        optimizer = torch.optim.AdamW(model.parameters())
        state = {name: buffer.clone() for name, buffer in model.named_buffers()}  # the EMA update runs in forward
        terms, _ = forward_backward(task, batch, optimizer, TrainConfig(precision="fp32"))
        model.load_state_dict(state, strict=False)
        gradients.append([terms["loss"].detach()] + [parameter.grad.clone() for parameter in model.parameters()])
    for eager, compiled in zip(*gradients, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_a_compiled_run_trains_and_saves_the_plain_model(tmp_path):
    eager = run(tmp_path / "eager", 1, precision="fp32", max_steps=3)
    compiled = run(tmp_path / "compiled", 1, precision="fp32", max_steps=3, compile="on")
    assert compiled[-1]["train"]["loss"] == pytest.approx(eager[-1]["train"]["loss"], rel=1e-3)
    eager_weights, _ = load_checkpoint(tmp_path / "eager" / LAST_CHECKPOINT)
    compiled_weights, _ = load_checkpoint(tmp_path / "compiled" / LAST_CHECKPOINT)
    assert compiled_weights.keys() == eager_weights.keys()  # no "_orig_mod." prefix from the compiled wrapper


def test_a_failing_compiler_is_a_clear_error_that_names_the_way_out(tmp_path, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real_compile(module, backend=broken_backend))
    with pytest.raises(TrainingError, match="--compile off"):
        run(tmp_path, 1, precision="fp32", max_steps=1, compile="on")
    assert not (tmp_path / LAST_CHECKPOINT).exists()
