"""`pml-ms-plus ablate` on the image benchmarks: tiny data sets written in each official layout,
a torchvision resnet18 at 32x32 from random weights, one epoch. Needs torchvision (and scipy):
skipped without them, except under PML_MS_PLUS_REQUIRE_VISION=1 (CI's vision venv), where they must import."""

import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

if os.environ.get("PML_MS_PLUS_REQUIRE_VISION"):  # CI's vision venv: fail, never skip
    import scipy.io as scipy_io
    import torchvision
else:
    torchvision = pytest.importorskip("torchvision")
    scipy_io = pytest.importorskip("scipy.io")

from PIL import Image  # noqa: E402

from pml_ms_plus.ablation import backbones, checkpoint, cli, images, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--backbone", "resnet18", "--pretrained", "none", "--image-size", "32", "--workers", "0"]
ONE_MS = '[study]\nseeds = 1\nepochs = 1\n[[variant]]\nname = "ms"\nloss = "pml_ms_plus.losses.MSLoss"\nloss_kwargs = { epsilon = 0.1 }\n'


def _example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_image(path, label, g, size=16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    colour = (np.array([label * 37, label * 91, label * 53]) % 256).astype(np.float64)
    pixels = np.clip(colour + g.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """CUB-200-2011: 200 classes x 2 images of 16x16 (the README's example generator)."""
    root = tmp_path_factory.mktemp("cub")
    _example("make_cub200_layout").write_cub200(str(root), per_class=2, size=16)
    return str(root)


def write_cars(root, per_class=2):
    g = np.random.default_rng(1)
    entries = []
    n = 0
    for c in range(1, 197):
        for _ in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            write_image(os.path.join(root, rel), c, g)
            entries.append((rel, c, n % 2))  # the file's own `test` flag: not the DML split
    annotations = np.array(
        [[(rel, c, t) for rel, c, t in entries]],
        dtype=[("relative_im_path", object), ("class", object), ("test", object)],
    )
    scipy_io.savemat(os.path.join(root, "cars_annos.mat"), {"annotations": annotations})


def write_sop(root):
    g = np.random.default_rng(2)
    folder = os.path.join(root, "Stanford_Online_Products")
    for file, classes, per in (("Ebay_train.txt", range(1, 11), 2), ("Ebay_test.txt", range(11, 21), 3)):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(per):
                rel = f"bicycle_final/{c}_{k}.JPG"
                write_image(os.path.join(folder, rel), c, g)
                lines.append(f"{len(lines)} {c} 1 {rel}")
        with open(os.path.join(folder, file), "w") as f:
            f.write("\n".join(lines) + "\n")


def write_inshop(root):
    """8 training items x 2 images; 6 test items with 1 query and 2 gallery images each."""
    g = np.random.default_rng(3)
    lines = []
    for item in range(14):
        kinds = ["train", "train"] if item < 8 else ["query", "gallery", "gallery"]
        for k, kind in enumerate(kinds):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{k:02d}_1_front.jpg"
            write_image(os.path.join(root, rel), item, g)
            lines.append(f"{rel} id_{item:08d} {kind}")
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n")


def write_imagefolder(root, classes=8, per_class=2):
    g = np.random.default_rng(4)
    for c in range(classes):
        for k in range(per_class):
            write_image(os.path.join(root, f"class_{c:02d}", f"{k}.png"), c, g)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, cub):
    out = {"cub200": cub}
    for name, writer in (
        ("cars196", write_cars),
        ("sop", write_sop),
        ("inshop", write_inshop),
        ("imagefolder", write_imagefolder),
    ):
        root = tmp_path_factory.mktemp(name)
        writer(str(root))
        out[name] = str(root)
    return out


def config(tmp_path, text=ONE_MS):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def ablate(tmp_path, dataset, root, *extra, text=ONE_MS, out="out"):
    bs = "40" if dataset in ("cub200", "cars196") else "8"  # 5 resp. 2 steps per epoch
    args = ["ablate", "--dataset", dataset, "--data-root", root, "--config", config(tmp_path, text)]
    args += ["--out", str(tmp_path / out), *FAST, "--batch-size", bs, "--m", "2", *extra]
    return cli.main(args)


def results(tmp_path, out="out"):
    with open(tmp_path / out / "results.json") as f:
        return json.load(f)


EXPECTED = {
    "cub200": dict(num_train_images=200, num_train_classes=100, num_test_images=200, num_test_classes=100),
    "cars196": dict(num_train_images=196, num_train_classes=98, num_test_images=196, num_test_classes=98),
    "sop": dict(num_train_images=20, num_train_classes=10, num_test_images=30, num_test_classes=10),
    "inshop": dict(
        num_train_images=16,
        num_train_classes=8,
        num_test_images=18,
        num_test_classes=6,
        num_query=6,
        num_gallery=12,
    ),
    "imagefolder": dict(num_train_images=8, num_train_classes=4, num_test_images=8, num_test_classes=4),
}


@pytest.mark.parametrize("dataset", list(EXPECTED))
def test_official_layouts_split_counts_and_one_epoch(tmp_path, layouts, dataset, monkeypatch):
    calls = []
    evaluate = train.evaluate

    def spy(query, query_labels, reference=None, reference_labels=None, device=None):
        calls.append((len(query), None if reference is None else len(reference)))
        return evaluate(query, query_labels, reference, reference_labels, device)

    monkeypatch.setattr(train, "evaluate", spy)
    assert ablate(tmp_path, dataset, layouts[dataset]) == 0
    meta = results(tmp_path)["meta"]
    assert {k: meta.get(k) for k in EXPECTED[dataset]} == EXPECTED[dataset]
    if dataset == "inshop":  # queries are retrieved in the gallery, not among themselves
        assert calls == [(6, 12)]
    else:
        assert calls == [(EXPECTED[dataset]["num_test_images"], None)]
    (row,) = results(tmp_path)["rows"]
    assert row["epoch"] == 1 and len(row["losses"]) == 1 and len(row["evaluations"]) == 1
    for k in (1, 2, 4, 8):
        assert 0.0 <= row[f"recall_at_{k}"] <= 1.0
    assert row["recall_at_1"] == pytest.approx(row["precision_at_1"])
    assert row["recall_at_1"] <= row["recall_at_2"] <= row["recall_at_4"] <= row["recall_at_8"]
    assert not os.path.exists(tmp_path / "out" / "checkpoints")  # removed once the run is in results.csv


def test_data_root_may_be_the_data_set_folder_itself(layouts):
    parent = images.load("cub200", layouts["cub200"])
    itself = images.load("cub200", os.path.join(layouts["cub200"], "CUB_200_2011"))
    assert parent.train.paths == itself.train.paths and len(parent.test) == 200
    assert sorted(set(parent.train.labels.tolist())) == list(range(100))  # renumbered 0..99
    sop = images.load("sop", os.path.join(layouts["sop"], "Stanford_Online_Products"))
    assert len(sop.train) == 20


def test_pretrained_path_loads_those_weights(tmp_path):
    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-default BatchNorm statistics, so that they are seen to load too
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = backbones.prepare("resnet18", str(path))
    torch.manual_seed(0)
    net = backbone.build(embedding_size=16, freeze_bn=True).eval()
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = reference(x)
        assert torch.equal(net.features(x), features)
        assert torch.equal(net(x), net.embed(features))
    # frozen BatchNorm: eval mode inside train(), affine parameters not trained
    net.train()
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(
        not p.requires_grad
        for m in net.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    )


def test_pretrained_path_runs_in_a_study(tmp_path, layouts):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": torchvision.models.resnet18(weights=None).state_dict()}, path)
    text = '[study]\nseeds = 1\n[[variant]]\nname = "floor"\nkind = "untrained"\n'
    assert ablate(tmp_path, "imagefolder", layouts["imagefolder"], "--pretrained", str(path), text=text) == 0
    assert results(tmp_path)["meta"]["pretrained"] == str(path)


def _bad_weights(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    if case == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif case == "other_arch":
        torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    elif case == "truncated":
        state = torchvision.models.resnet18(weights=None).state_dict()
        torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, path)
    elif case == "pickled_object":
        torch.save(argparse.Namespace(w=torch.zeros(1)), path)  # any class: refused by weights_only
    elif case == "not_tensors":
        torch.save({"a": 1, "b": "x"}, path)
    elif case == "missing":
        return str(tmp_path / "nowhere.pth")
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("garbage", "not a weights file torch.load(weights_only=True) can read"),
        ("other_arch", "does not fit resnet18: unexpected keys: layer1.2.conv1.weight"),
        ("truncated", "does not fit resnet18: missing keys: layer4.0.conv1.weight"),
        ("pickled_object", "not a weights file torch.load(weights_only=True) can read"),
        ("not_tensors", "not a state dict"),
        ("missing", "no such file"),
    ],
)
def test_wrong_pretrained_file_exits_2(tmp_path, layouts, capfd, case, message):
    path = _bad_weights(tmp_path, case)
    assert ablate(tmp_path, "imagefolder", layouts["imagefolder"], "--pretrained", path) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pml-ms-plus: error: --pretrained "), err
    assert message in err[0]
    assert not os.path.exists(tmp_path / "out")


def _break(layouts, tmp_path, case):
    """A copy-free broken layout: ``(dataset, root, text the error must hold)``."""
    root = tmp_path / "broken"
    root.mkdir()
    if case == "cub_no_index":
        return "cub200", str(root), f"no index file {root}/images.txt or {root}/CUB_200_2011/images.txt"
    if case == "cub_bad_line":
        folder = root / "CUB_200_2011"
        folder.mkdir()
        (folder / "images.txt").write_text("1 a.jpg\n2\n")
        (folder / "image_class_labels.txt").write_text("1 1\n")
        return "cub200", str(root), f"{folder}/images.txt, line 2: expected '<image_id> <path>'"
    if case == "cub_missing_image":
        folder = root / "CUB_200_2011"
        folder.mkdir()
        (folder / "images.txt").write_text("1 001.A/a.jpg\n")
        (folder / "image_class_labels.txt").write_text("1 1\n")
        return (
            "cub200",
            str(root),
            f"1 of the 1 images listed in {folder}/images.txt are missing, first {folder}/images/001.A/a.jpg",
        )
    if case == "cars_no_annotations":
        scipy_io.savemat(str(root / "cars_annos.mat"), {"class_names": np.array(["a", "b"])})
        return "cars196", str(root), f"{root}/cars_annos.mat has no struct array 'annotations'"
    if case == "sop_no_test":
        folder = root / "Stanford_Online_Products"
        folder.mkdir()
        (folder / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n")
        return "sop", str(root), f"no index file {folder}/Ebay_test.txt"
    if case == "inshop_bad_header":
        (root / "list_eval_partition.txt").write_text("1\nname item status\nimg/a.jpg id_1 train\n")
        return "inshop", str(root), f"{root}/list_eval_partition.txt, line 2: expected the header"
    if case == "imagefolder_too_few":
        (root / "a").mkdir()
        return "imagefolder", str(root), "holds 1 class folders, at least 4 are needed"
    if case == "no_data_root":
        return "cub200", None, "--dataset cub200 needs --data-root"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "cub_no_index",
        "cub_bad_line",
        "cub_missing_image",
        "cars_no_annotations",
        "sop_no_test",
        "inshop_bad_header",
        "imagefolder_too_few",
        "no_data_root",
    ],
)
def test_bad_layout_exits_2_naming_the_file(tmp_path, layouts, capfd, case):
    dataset, root, message = _break(layouts, tmp_path, case)
    args = ["ablate", "--dataset", dataset, "--out", str(tmp_path / "out"), *FAST]
    if root is not None:
        args += ["--data-root", root]
    assert cli.main(args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pml-ms-plus: error: "), err
    assert message in err[0], err[0]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--dataset", "digits", "--backbone", "resnet18"],
            "setting 'backbone' applies to the image data sets",
        ),
        (["--dataset", "imagefolder", "--backbone", "resnet5"], "unknown --backbone 'resnet5'"),
        (["--dataset", "imagefolder", "--backbone", "timm:resnet18"], "timm"),
        (["--dataset", "imagefolder", "--amp", "fp8"], "invalid choice"),
    ],
)
def test_bad_image_settings_exit_2(tmp_path, layouts, capfd, args, message):
    if "timm:resnet18" in args and importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    full = ["ablate", "--out", str(tmp_path / "out"), "--workers", "0", *args]
    if "imagefolder" in args:
        full += ["--data-root", layouts["imagefolder"]]
    with pytest.raises(SystemExit) if "fp8" in args else _nothing():
        assert cli.main(full) == 2
    err = capfd.readouterr().err
    assert message in err
    assert not os.path.exists(tmp_path / "out")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_raw_floor_is_refused_for_images(tmp_path, layouts, capfd):
    text = '[[variant]]\nname = "raw"\nkind = "raw"\n'
    assert ablate(tmp_path, "imagefolder", layouts["imagefolder"], text=text) == 2
    assert "kind 'raw' (kNN on the input pixels) is for the toy data sets only" in capfd.readouterr().err


def test_amp_bf16_runs_on_the_cpu(tmp_path, layouts):
    assert ablate(tmp_path, "imagefolder", layouts["imagefolder"], "--amp", "bf16") == 0
    (row,) = results(tmp_path)["rows"]
    assert results(tmp_path)["meta"]["amp"] == "bf16"
    assert all(np.isfinite(row["losses"])) and 0.0 <= row["mean_average_precision_at_r"] <= 1.0


TWO_EPOCHS = (
    '[study]\nseeds = 1\nepochs = 2\neval_every = 1\nwarmup_epochs = 0.5\nschedule = "cosine"\n'
    '[[variant]]\nname = "floor"\nkind = "untrained"\n'
    '[[variant]]\nname = "ms"\nloss = "pml_ms_plus.losses.MSLoss"\nloss_kwargs = { epsilon = 0.1 }\n'
)


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, layouts, monkeypatch, capsys):
    root = layouts["imagefolder"]
    # the reference: the same study, uninterrupted
    assert ablate(tmp_path, "imagefolder", root, text=TWO_EPOCHS, out="whole") == 0
    whole = results(tmp_path, "whole")["rows"]

    save = checkpoint.save

    def save_then_die(file, state):  # the run is killed right after epoch 1 is checkpointed
        save(file, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    assert ablate(tmp_path, "imagefolder", root, text=TWO_EPOCHS) == 130
    out = tmp_path / "out"
    (ckpt,) = checkpoint.existing(str(out))
    state = torch.load(out / "checkpoints" / ckpt, weights_only=True)
    assert state["epoch"] == 1 and len(state["losses"]) == 1
    assert [r["variant"] for r in results(tmp_path)["rows"]] == ["floor"]  # the finished run is saved
    monkeypatch.setattr(checkpoint, "save", save)

    # a plain run refuses to start over a checkpoint; --resume continues it
    assert ablate(tmp_path, "imagefolder", root, text=TWO_EPOCHS) == 2
    capsys.readouterr()
    assert ablate(tmp_path, "imagefolder", root, "--resume", text=TWO_EPOCHS) == 0
    printed = capsys.readouterr().out
    assert "1 finished runs kept, 1 to go" in printed
    assert "resuming ms / seed 0 from its checkpoint after epoch 1/2" in printed
    assert "epoch 1/2" not in printed.replace("after epoch 1/2", "")  # epoch 1 was not trained again
    resumed = results(tmp_path)["rows"]
    assert resumed[1]["losses"][0] == state["losses"][0]
    # continued, not restarted: the same numbers as the uninterrupted run, epoch for epoch
    assert resumed[1]["losses"] == whole[1]["losses"]
    assert resumed[1]["evaluations"] == whole[1]["evaluations"]
    assert not os.path.exists(out / "checkpoints")


def test_workers_do_not_change_the_numbers(tmp_path, layouts):
    """Each sample's augmentation draws from its own seed, whichever worker decodes it."""
    root = layouts["imagefolder"]
    assert ablate(tmp_path, "imagefolder", root, "--batch-size", "4", out="w0") == 0
    assert ablate(tmp_path, "imagefolder", root, "--batch-size", "4", "--workers", "2", out="w2") == 0
    a, b = results(tmp_path, "w0")["rows"][0], results(tmp_path, "w2")["rows"][0]
    assert a["losses"] == b["losses"] and a["evaluations"] == b["evaluations"]


def test_an_image_that_fails_to_decode_stops_the_study_naming_it(tmp_path, capfd):
    root = tmp_path / "folder"
    write_imagefolder(str(root))
    for c in range(4):  # every training class, so that the first batch meets one
        (root / f"class_{c:02d}" / "1.png").write_bytes(b"\x89PNG but truncated")
    text = (
        '[study]\nseeds = 1\nepochs = 1\n[[variant]]\nname = "floor"\nkind = "untrained"\n'
        '[[variant]]\nname = "ms"\nloss = "pml_ms_plus.losses.MSLoss"\n'
    )
    assert ablate(tmp_path, "imagefolder", str(root), "--batch-size", "4", "--workers", "1", text=text) == 1
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("pml-ms-plus:")]
    assert len(err) == 1 and f"cannot decode image {root}/class_0" in err[0] and "/1.png: " in err[0], err
    assert "--resume" in err[0]
    assert [r["variant"] for r in results(tmp_path)["rows"]] == ["floor"]  # the finished run is saved


def test_example_cub_config_runs_shortened(tmp_path, layouts):
    """examples/cub200_ms.toml, the README's reproduction recipe, cut to one short epoch."""
    args = ["ablate", "--dataset", "cub200", "--data-root", layouts["cub200"], "--out", str(tmp_path / "out")]
    args += [
        "--config",
        os.path.join(ROOT, "examples", "cub200_ms.toml"),
        *FAST,
        "--epochs",
        "1",
        "--seeds",
        "1",
    ]
    assert cli.main(args) == 0
    res = results(tmp_path)
    assert res["meta"]["select"] == "best" and res["meta"]["baseline"] == "MS (alpha=2, beta=40)"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Selection: the best evaluation of each run by R@1" in summary
    assert "paired two-sided t-test" in summary
