"""Trainer and CLI: the authors' flags, a tiny real run, its records, resume and failure modes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastiaa import cli, flags
from fastiaa.config import TrainConfig
from fastiaa.errors import NonFiniteError
from fastiaa.train import Trainer, evaluate_checkpoint


def parse(*argv):
    return flags.config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_authors_command_maps_onto_config():
    cfg = parse("--dataset", "cub200", "--backbone", "googlenet", "--loss", "Contrastive", "--lr", "3e-5",
                "--intra_lamda", "0.8", "--aug_num", "3", "--lr-decay-epochs", "40", "60", "--diag", "0",
                "--embedding-size", "256", "--num_image_per_class", "4", "--weight_path", "/w", "--gpu-id", "1")
    assert (cfg.data.dataset, cfg.model.backbone, cfg.optim.loss_name, cfg.optim.lr) == ("cub200", "googlenet",
                                                                                      "contrastive", 3e-5)
    assert (cfg.iaa.intra_lamda, cfg.iaa.aug_num, cfg.optim.lr_decay_epochs) == (0.8, 3, (40, 60))
    assert cfg.iaa.covariance == "auto"  # --diag 0: full covariance, dense or low-rank by size
    assert (cfg.model.embedding_size, cfg.model.weight_path, cfg.runtime.device) == (256, "/w", "cuda:1")
    assert cfg.data.data == os.path.abspath("MyDataset")  # stored absolute: the checkpoint works from anywhere
    # both spellings of a flag
    assert parse("--lr_decay_gamma", "0.5").optim.lr_decay_gamma == parse("--lr-decay-gamma", "0.5").optim.lr_decay_gamma == 0.5
    assert parse("--diag", "1").iaa.covariance == "diag" and parse("--covariance", "lowrank").iaa.covariance == "lowrank"
    assert parse().flat() == TrainConfig.build(data=os.path.abspath("data/kanji")).flat()  # defaults: TrainConfig's


def test_preset_applies_published_settings_before_flags():
    cfg = parse("--preset", "stanford", "--lr", "2e-4").flat()
    assert [cfg[k] for k in ("batch", "num_image_per_class", "intra_lamda", "aug_num", "lr")] == [180, 3, 0.6, 3, 2e-4]
    assert parse("--preset", "stanford", "--loss", "Contrastive").iaa.aug_num == 2
    big = parse("--preset", "inshop", "--backbone", "resnet50").flat()
    assert (big["batch"], big["lr"], big["intra_lamda"]) == (256, 1e-4, 0.5)
    assert parse("--preset", "cub200", "--loss", "contrastive").optim.lr == 3e-5
    assert parse().data.data == os.path.abspath("data/kanji")


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
    return TrainConfig.build(**values)


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
    Trainer(killed.replace(resume=True)).run()
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
        Trainer(cfg.replace(resume=True, embedding_size=64)).run()
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == before
    assert json.loads((cfg.run_dir() / "config.json").read_text())["model"]["embedding_size"] == 32


def test_non_finite_loss_stops_with_epoch_and_step(kanji_root, tmp_path):
    trainer = Trainer(tiny_config(kanji_root, tmp_path, eval_every=0, intra=False))
    forward = trainer.model.forward
    trainer.model.forward = lambda x: forward(x) * float("nan")
    with pytest.raises(NonFiniteError, match="epoch 1, step 1"):
        trainer.run()


@pytest.mark.parametrize("covariance, limit, form", [("auto", 2.0, "full"), ("auto", 0.0, "lowrank"),
                                                     ("full", 0.0, "full"), ("diag", 0.0, "diag")])
def test_covariance_form_is_chosen_by_iaa_and_trains(kanji_root, tmp_path, covariance, limit, form):
    from fastiaa.kernels import LowRankFactor

    cfg = tiny_config(kanji_root, tmp_path, covariance=covariance, dense_full_limit_gib=limit,
                      iter_per_epoch=1, eval_every=0)
    trainer = Trainer(cfg)
    assert trainer.iaa.form == form
    trainer.refresh(2)
    if form == "lowrank":
        assert isinstance(trainer.iaa.factor, LowRankFactor)
    else:
        assert trainer.iaa.factor.shape == ((24, 32, 32) if form == "full" else (24, 32))
    record = trainer.train_epoch(2)
    assert record["lambda"] > 0 and record["loss"] >= 0 and record["loss"] == record["loss"]


def test_choices_come_from_the_registries():
    from fastiaa import registry
    from fastiaa.data import DATASETS
    from fastiaa.losses import MultiSimilarityLoss
    from fastiaa.models import list_models

    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    help_of = {a.dest: a.help for a in train._actions}
    assert help_of["dataset"] == f"one of {', '.join(DATASETS)}"
    assert help_of["backbone"] == f"one of {', '.join(registry.BACKBONES)}" and list_models() == sorted(registry.BACKBONES)
    assert all(callable(registry.load(registry.BACKBONES, name)) for name in registry.BACKBONES)
    assert registry.load(registry.LOSSES, registry.loss_name("MS")) is MultiSimilarityLoss
    assert {registry.loss_name(s) for s in registry.LOSS_SPELLINGS} == set(registry.LOSSES)
    with pytest.raises(ValueError, match="choose one of"):
        registry.load(registry.BACKBONES, "vgg")


def test_config_groups_round_trip_and_reject_unknown_settings():
    cfg = TrainConfig.build(intra_lamda=0.7, batch=60, covariance="lowrank", work_memory_mib=64, recall=[1, 5])
    assert (cfg.iaa.intra_lamda, cfg.optim.batch, cfg.iaa.covariance, cfg.runtime.work_memory_mib) == (0.7, 60, "lowrank", 64)
    assert cfg.eval.recall == (1, 5) and TrainConfig.from_json(cfg.to_json()) == cfg
    assert cfg.replace(batch=30).optim.batch == 30 and cfg.optim.batch == 60
    with pytest.raises(ValueError, match="unknown settings"):
        TrainConfig.build(diag=False)
    with pytest.raises(ValueError, match="not a fastiaa training configuration"):
        TrainConfig.from_dict({"lr": 1e-4})


def test_a_training_step_reads_the_device_only_every_log_every_steps(kanji_root, tmp_path, monkeypatch):
    """Calls of fastiaa's own code that wait for the device (item, tolist, bool, ...) during an
    epoch with synthesis: one per log_every steps, none in between (the GPU path: the value
    checks that the CPU allows are those a GPU run skips). The loaders are left out: they read
    host memory (files, the host cache) on every machine."""
    import sys
    from pathlib import Path

    from fastiaa.kernels import _dispatch, sampling

    cfg = tiny_config(kanji_root, tmp_path, iter_per_epoch=6, log_every=3, eval_every=0)
    trainer = Trainer(cfg)
    trainer.refresh(2)
    assert trainer.iaa.active(2)
    monkeypatch.setattr(sampling, "reads_values", lambda tensor: False)  # as on a GPU
    ours = [str(Path(m.__file__).parent) for m in (sys.modules["fastiaa"], _dispatch)]
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(caller.startswith(root) for root in ours):
                calls.append((_name, caller))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    record = trainer.train_epoch(2)
    monkeypatch.undo()
    assert record["lambda"] > 0 and record["loss"] > 0
    assert [name for name, _ in calls] == ["tolist", "tolist"], calls  # steps 3 and 6


def test_device_cuda_n_becomes_the_device_of_the_whole_run(monkeypatch):
    from fastiaa import runtime

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert runtime.resolve_device("cuda") == torch.device("cuda", 0)
    for bad, message in (("cuda:2", "only 2 CUDA device"), ("tpu", "not a device"), ("meta", "cpu or cuda")):
        with pytest.raises(ValueError, match=message):
            runtime.resolve_device(bad)
    assert parse("--gpu-id", "1").runtime.device == "cuda:1"


def test_loaders_iaa_and_evaluation_get_the_trainers_device(kanji_root, tmp_path, monkeypatch):
    from fastiaa import train

    seen = {}
    real_eval, real_loader = train.evaluate, train.build_train_loader
    monkeypatch.setattr(train, "evaluate", lambda model, loaders, device, *a, **k: seen.setdefault("eval", device)
                        and real_eval(model, loaders, device, *a, **k))
    monkeypatch.setattr(train, "build_train_loader", lambda *a, **k: seen.setdefault("loader", k["device"])
                        and real_loader(*a, **k))
    trainer = Trainer(tiny_config(kanji_root, tmp_path, device="cpu", iter_per_epoch=1))
    trainer.evaluate()
    assert seen == {"eval": trainer.device, "loader": str(trainer.device)}
    assert all(loader.device == trainer.device for loader in trainer.eval_loaders.values())
    assert trainer.train_loader.impl.device == trainer.device
    assert trainer.iaa.statistics.mean.device == trainer.device
    assert next(trainer.model.parameters()).device == trainer.device


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_gpu_training_epoch_with_amp_and_triton_synthesis(photo_root, tmp_path, amp):
    """One epoch on CUDA with AMP (fp16 through the GradScaler, or bf16), IAA synthesis through the
    compiled Triton kernel: a finite loss, moved weights, statistics and batches on the GPU."""
    cfg = tiny_config(photo_root, tmp_path, device="cuda", amp=amp, kernels="triton", iter_per_epoch=3,
                      eval_every=0, pretrained=False)
    trainer = Trainer(cfg)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.refresh(2)
    assert trainer.iaa.factor.is_cuda and trainer.iaa.active(2)
    record = trainer.train_epoch(2)
    assert record["lambda"] > 0 and 0 < record["loss"] < 10
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before) and all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.gpu
def test_gpu_evaluation_equals_cpu(photo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions on both sides
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = tiny_config(photo_root, tmp_path, amp="off", eval_every=0, pretrained=False)
    on_gpu = Trainer(cfg.replace(device="cuda")).evaluate()
    on_cpu = Trainer(cfg.replace(device="cpu", name="cpu")).evaluate()
    assert on_gpu.keys() == on_cpu.keys()
    for key, value in on_cpu.items():  # the same model (seeded): float32 rounding of the convolutions only
        assert on_gpu[key] == pytest.approx(value, abs=0.011), key


# ---------------------------------------------------------------- your own data, pictures of the results

def test_a_drawn_split_is_written_beside_the_run_and_every_evaluation_draws_retrievals(own_run):
    from fastiaa.data import load_dataset
    from fastiaa.report import schedule_marks

    run, drawn = own_run["run"], load_dataset("folder", own_run["folder"])
    written = load_dataset("csv", run / "split.csv")  # the split, readable as a csv dataset
    for name in ("train", "test"):
        a, b = getattr(drawn, name), getattr(written, name)
        assert a.paths == b.paths and [a.class_ids[k] for k in a.labels] == [b.class_ids[k] for k in b.labels]
    assert (len(drawn.train.class_ids), len(drawn.test.class_ids)) == (24, 24)
    assert (run / "retrievals.png").stat().st_size > 10_000
    assert schedule_marks(records(own_run["config"])) == ([1], 1)  # refresh and synthesis in epoch 1


def test_training_on_a_csv_copy_with_a_query_gallery_protocol(kanji_root, tmp_path, capsys):
    data = tmp_path / "kanji.csv"
    assert cli.main(["data", "convert", "--dataset", "kanji", "--data", str(kanji_root), "--to", "csv",
                     "--out", str(data), "--classes", "12"]) == 0
    header, *rows = data.read_text().splitlines()  # test rows: alternately query and gallery
    flags = [",0,0" if row.endswith(",train") else (",1,0" if i % 2 else ",0,1") for i, row in enumerate(rows)]
    data.write_text("\n".join([header + ",is_query,is_gallery"] + [r + f for r, f in zip(rows, flags)]) + "\n")
    assert cli.main(["train", "--dataset", "csv", "--data", str(data), "--backbone", "efficientnet_lite0",
                     "--image-size", "48", "--resize-size", "56", "--batch", "24", "--num_image_per_class", "3",
                     "--iter-per-epoch", "1", "--epochs", "1", "--embedding-size", "32", "--workers", "0",
                     "--save-dir", str(tmp_path), "--name", "csv"]) == 0
    run = tmp_path / "csv"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (run / "retrievals.png").is_file() and not (run / "split.csv").exists()  # the CSV holds the split
    assert evaluate_checkpoint(run / "best.pt", device="cpu")["recall@1"] == last["recall@1"]
    assert last["num_queries"] == 12 * 8 // 2  # the queries, searched against the gallery


def test_schedule_marks_and_retrieval_frames(kanji_root, tmp_path):
    import numpy as np
    from PIL import Image

    from fastiaa.data import load_dataset
    from fastiaa.report import FRAME_COLOURS, Hit, Retrieval, plot_retrievals, schedule_marks

    recs = [{"epoch": 0}, {"epoch": 1, "lambda": 0.0, "loss": 1}, {"epoch": 2, "refresh_s": 3, "lambda": 0.0, "loss": 1},
            {"epoch": 3, "lambda": 0.5, "loss": 2}, {"epoch": 4, "refresh_s": 3, "lambda": 0.5, "loss": 2}]
    assert schedule_marks(recs) == ([2, 4], 3) and schedule_marks(recs[:3]) == ([2], None)
    a, b, c = load_dataset("kanji", kanji_root).test.paths[:3]
    retrievals = [Retrieval(a, "x", (Hit(b, "x", 0.9), Hit(c, "y", 0.5))), Retrieval(b, "", (Hit(a, "x", 0.8),))]
    assert plot_retrievals(retrievals, tmp_path / "r.png") == [[True, False], [None]]
    png = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"))
    for flag, colour in FRAME_COLOURS.items():  # each frame colour is drawn (4 px wide)
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert (png == rgb).all(-1).sum() > 200, flag
