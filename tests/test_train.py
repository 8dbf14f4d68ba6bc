"""Trainer and CLI: the authors' flags, a tiny real run, its records, resume and failure modes."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from fastiaa import cli
from fastiaa.config import TrainConfig
from fastiaa.train import NonFiniteError, Trainer, evaluate_checkpoint


def parse(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_authors_command_maps_onto_config():
    cfg = parse("--dataset", "cub200", "--backbone", "googlenet", "--loss", "Contrastive", "--lr", "3e-5",
                "--intra_lamda", "0.8", "--aug_num", "3", "--lr-decay-epochs", "40", "60", "--diag", "0",
                "--embedding-size", "256", "--num_image_per_class", "4", "--weight_path", "/w", "--gpu-id", "1")
    assert (cfg.dataset, cfg.backbone, cfg.loss_name, cfg.lr) == ("cub200", "googlenet", "contrastive", 3e-5)
    assert (cfg.intra_lamda, cfg.aug_num, cfg.lr_decay_epochs, cfg.diag) == (0.8, 3, (40, 60), False)
    assert (cfg.embedding_size, cfg.weight_path, cfg.device) == (256, "/w", "cuda:1")
    assert cfg.data == os.path.abspath("MyDataset")  # stored absolute: the checkpoint works from anywhere
    # both spellings of a flag
    assert parse("--lr_decay_gamma", "0.5").lr_decay_gamma == parse("--lr-decay-gamma", "0.5").lr_decay_gamma == 0.5


def test_preset_applies_published_settings_before_flags():
    cfg = parse("--preset", "stanford", "--lr", "2e-4")
    assert (cfg.batch, cfg.num_image_per_class, cfg.intra_lamda, cfg.aug_num, cfg.lr) == (180, 3, 0.6, 3, 2e-4)
    assert parse("--preset", "stanford", "--loss", "Contrastive").aug_num == 2
    big = parse("--preset", "inshop", "--backbone", "resnet50")
    assert (big.batch, big.lr, big.intra_lamda) == (256, 1e-4, 0.5)
    assert parse("--preset", "cub200", "--loss", "contrastive").lr == 3e-5
    assert parse().data == os.path.abspath("data/kanji")


@pytest.mark.parametrize("argv, message", [
    (("--loss", "arcface"), "choose MS, Contrastive or Triplet"),
    (("--amp", "banana"), "choose one of auto, off, bf16, fp16"),
    (("--correction", "maybe"), "choose one of auto, on, off"),
    (("--batch", "0"), "must be > 0"),
    (("--lr", "-1"), "must be > 0"),
    (("--update_every_M_epoch", "0"), "must be > 0"),
    (("--backbone", "vgg"), "choose one of googlenet"),
])
def test_bad_values_are_rejected_while_parsing(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_input_errors_print_one_line_not_a_traceback(tmp_path, capsys):
    code = cli.main(["train", "--dataset", "cub200", "--data", str(tmp_path / "missing"), "--pretrained", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastiaa train: error:") and "CUB_200_2011" in err
    assert "Traceback" not in err


def tiny_config(root, tmp_path, **kw) -> TrainConfig:
    values = dict(dataset="kanji", data=str(root), backbone="efficientnet_lite0", image_size=48, resize_size=56,
                  batch=24, eval_batch=64, num_image_per_class=3, iter_per_epoch=2, epochs=3, start_epoch=1,
                  update_every_M_epoch=1, lr=1e-4, lr_decay_epochs=(2,), embedding_size=32, workers=0,
                  correction="on", num_neighbor=5, save_dir=str(tmp_path), name="run", seed=3)
    values.update(kw)
    return TrainConfig(**values)


def records(cfg):
    return [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]


def comparable(recs):
    drop = {"images_per_s", "train_s", "refresh_s", "eval_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def test_tiny_run_writes_records_and_resumes_to_the_same_result(kanji_root, tmp_path):
    straight = tiny_config(kanji_root, tmp_path / "a")
    best = Trainer(straight).run()
    recs = records(straight)
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3]
    assert "loss" not in recs[0] and all(r["loss"] > 0 for r in recs[1:])
    assert "refresh_s" in recs[1] or "refresh_s" in recs[2]           # refresh after start_epoch
    assert recs[1]["lambda"] == 0.0 and recs[2]["lambda"] > 0.0       # synthesis from start_epoch + 1
    for r in recs:
        assert 0.0 <= r["recall@1"] <= r["recall@2"] <= r["recall@4"] <= r["recall@8"] <= 1.0
        assert 0.0 <= r["map@r"] <= r["r_precision"] + 1e-9 <= 1.0 + 1e-9
    assert best["recall@1"] == max(r["recall@1"] for r in recs)
    run = straight.run_dir()
    for name in ("config.json", "losses_and_recalls.png", "last.pt", "best.pt", "paper_comparison.md"):
        assert (run / name).is_file(), name
    assert TrainConfig.from_json((run / "config.json").read_text()) == straight

    # the same run killed during epoch 3, then resumed
    killed = tiny_config(kanji_root, tmp_path / "b")
    trainer = Trainer(killed)
    real = trainer.train_epoch

    def crash(epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(epoch)

    trainer.train_epoch = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert [r["epoch"] for r in records(killed)] == [0, 1, 2]
    Trainer(dataclasses.replace(killed, resume=True)).run()
    assert comparable(records(killed)) == comparable(recs)
    a = torch.load(run / "last.pt", weights_only=False)["model"]
    b = torch.load(killed.run_dir() / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # `fastiaa eval` on the final checkpoint reproduces the last epoch's metrics
    metrics = evaluate_checkpoint(run / "last.pt", device="cpu")
    assert metrics["recall@1"] == pytest.approx(recs[-1]["recall@1"])
    assert metrics["map@r"] == pytest.approx(recs[-1]["map@r"], abs=1e-6)


def test_existing_run_is_never_overwritten_and_resume_checks_settings(kanji_root, tmp_path):
    cfg = tiny_config(kanji_root, tmp_path, epochs=1, iter_per_epoch=1, intra=False)
    Trainer(cfg).run()
    before = (cfg.run_dir() / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        Trainer(cfg).run()
    with pytest.raises(ValueError, match="--embedding-size 32 -> 64"):
        Trainer(dataclasses.replace(cfg, resume=True, embedding_size=64)).run()
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == before
    assert json.loads((cfg.run_dir() / "config.json").read_text())["embedding_size"] == 32


def test_non_finite_loss_stops_with_epoch_and_step(kanji_root, tmp_path):
    trainer = Trainer(tiny_config(kanji_root, tmp_path, eval_every=0, intra=False))
    forward = trainer.model.forward
    trainer.model.forward = lambda x: forward(x) * float("nan")
    with pytest.raises(NonFiniteError, match="epoch 1, step 1"):
        trainer.run()


@pytest.mark.parametrize("form, limit, low_rank", [("auto", 2.0, False), ("auto", 0.0, True), ("dense", 0.0, False)])
def test_full_covariance_picks_dense_or_low_rank_and_trains(kanji_root, tmp_path, form, limit, low_rank):
    from fastiaa.kernels import LowRankFactor
    from fastiaa.iaa import SamplingFactor

    cfg = tiny_config(kanji_root, tmp_path, diag=False, full_covariance=form, dense_full_limit_gib=limit,
                      iter_per_epoch=1, eval_every=0)
    trainer = Trainer(cfg)
    assert trainer.low_rank is low_rank
    trainer.refresh(2)
    assert isinstance(trainer.factor, LowRankFactor if low_rank else SamplingFactor)
    record = trainer.train_epoch(2)
    assert record["lambda"] > 0 and record["loss"] >= 0 and record["loss"] == record["loss"]
