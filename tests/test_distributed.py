"""Training under torchrun (2 CPU processes, gloo): same weights on every rank, no rank left waiting."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src import engine
from src.model_factory import build_model, load_weights
from tests.conftest import AMP, EXACT, RECON, REPO, assert_same_weights, common_args, final_state, torchrun


def test_torchrun_corrupt_batches_and_a_corrupt_epoch_neither_hang_nor_abort(prepared64, tmp_path):
    """Every file rank 1 draws in epoch 0 cut to 200 bytes, batches of 1: each step has an empty batch on rank 1 and
    a good one on rank 0 (both must skip it, no rank left waiting), and the epoch's metric reduce has one shape on
    every rank though rank 1 has no metrics."""
    from torch.utils.data import DistributedSampler

    from src.data import PreparedCrops

    data = tmp_path / "data"
    shutil.copytree(prepared64, data)
    dataset = PreparedCrops(data / "train")
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    for index in sampler:
        victim = dataset.files[index]
        victim.write_bytes(victim.read_bytes()[:200])
    argv = common_args(data, tmp_path, "--epochs", "1", "--max_steps_per_epoch", "3", "--batch_size", "1",
                       "--device", "cpu", "--train_scope", "all")
    result = torchrun("src.train_finetune_relu", argv, 29519)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("an empty batch, step skipped") == 3 and "same on all 2 ranks" in result.stdout
    assert "every train step of this epoch was skipped" in result.stdout


def test_torchrun_sigterm_resume_is_exact(prepared64, tmp_path):
    flags = [*EXACT[:-1], "4", "--epochs", "2", "--device", "cpu", "--num_workers", "1"]
    straight = torchrun("src.train_finetune_relu", common_args(prepared64, tmp_path / "straight", *flags), 29531)
    assert straight.returncode == 0, straight.stderr[-3000:]
    argv = common_args(prepared64, tmp_path / "stopped", *flags)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                             "29533", "-m", "src.train_finetune_relu", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    progress = ""
    while "| 1/4 [" not in progress:  # rank 0's first step is done, so both ranks are in the loop
        progress += proc.stderr.read(1) or pytest.fail(f"the run ended before its first step: {progress[-3000:]}")
    # To the ranks, as a cluster's scheduler sends it: torchrun forwards a SIGTERM of its own, but SIGKILLs
    # ranks still saving 30 s later, which a loaded 2-core test machine can exceed.
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for rank in ranks:
        os.kill(int(rank), signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert len(ranks) == 2 and err.count("stopped by SIGTERM after step") == 2, err[-3000:]
    last = tmp_path / "stopped" / "ckpt" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["epoch_step"] >= 1
    resumed = torchrun("src.train_finetune_relu", argv + ["--resume", str(last)], 29535)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_state(tmp_path / "straight" / "ckpt" / "last.pt"), final_state(last))


def test_torchrun_two_cpu_processes_hyperprior_recon_per_rank_rng(prepared64, tmp_path):
    """Two ranks (gloo): one printer, the same weights, a checkpoint without DDP's prefix, rank 0's recon PNGs;
    a hyperprior under DDP with no rate term (h_a/h_s frozen), and each rank its own RNG stream."""
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--model", "bmshj2018-hyperprior",
                       "--replace_parts", "all", "--train_scope", "all", *RECON, *AMP)  # the recipe's bf16
    result = torchrun("src.train_finetune_relu", argv, 29521)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x2 |" in result.stdout and "effective batch 4" in result.stdout
    assert "hyperprior" in result.stdout and "same on all 2 ranks" in result.stdout
    assert result.stdout.count("epoch 1/1") == 1, "only rank 0 prints"
    printed = float(result.stdout.split("weights checksum ")[1].split()[0])
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    model = load_weights(build_model(ckpt["arch"]), ckpt["state_dict"], "ddp")
    assert engine.weights_checksum(model) == pytest.approx(printed, rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "recon" / "epoch_001").iterdir()) == ["00000.png", "00001.png"]
    first, second = ckpt["rng_per_rank"]
    assert not torch.equal(first["torch"], second["torch"]), "ranks must not share quantisation noise"


def test_torchrun_init_from_gdn_fits_on_rank_0_and_broadcasts(prepared64, tmp_path):
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--train_scope", "all",
                       "--init_from_gdn", "true", "--gdn_fit_steps", "5", "--gdn_fit_images", "4")
    result = torchrun("train_finetune_npu.py", argv, 29523)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("init_from_gdn: fitting 6 blocks") == 1 and "same on all 2 ranks" in result.stdout


def test_torchrun_qat_ranks_share_rank_0s_scales(float_run, prepared64, coco_root, tmp_path):
    """QAT under DDP: parametrised weights, hooks, learned scales (parameters) train to the same weights."""
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--train_scope", "all",
                       "--qat", "true", "--qat_scales", "learned", "--base_checkpoint",
                       str(float_run), "--qat_calib_dir", str(coco_root / "train2017"),
                       "--qat_calib_count", "2")
    result = torchrun("train_finetune_npu.py", argv, 29527)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QAT phase 2/2" in result.stdout and "same on all 2 ranks" in result.stdout


def _agree_worker(rank, init_file, results):
    import torch.distributed as dist

    from src.distributed import DistInfo
    from src.cli import StopRequest

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tr = argparse.Namespace(device=torch.device("cpu"), dist=DistInfo(rank, 2, rank), stop=StopRequest())
    overflow = "first bad output in module 'g_a.2'" if rank == 1 else None
    verdict = engine.agree_on_step(tr, torch.tensor(rank == 0), overflow)
    results[rank] = (verdict.skip, verdict.stop, verdict.overflow)
    dist.destroy_process_group()


def test_all_ranks_agree_on_an_overflow_seen_by_one(tmp_path):
    """--overflow_check on one rank must stop every rank with the same message (no rank left in a collective)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
        assert dict(results) == {r: (True, False, "first bad output in module 'g_a.2'") for r in (0, 1)}


def test_torchrun_only_rank_0_downloads_zoo_weights(prepared64, tmp_path):
    """Offline (a proxy on a closed loopback port): one download attempt and one error line, not one per rank."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "hub"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    argv = common_args(prepared64, tmp_path, "--epochs", "1", "--device", "cpu", "--pretrained", "true")
    result = torchrun("src.train_finetune_relu", argv, 29525, env=env)
    assert result.returncode != 0
    assert result.stderr.count("could not download CompressAI's pretrained") == 1, result.stderr[-3000:]

