"""The three data sources, the sample transform, the split, and the resumable batch order."""

import gc
import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae.config import DataConfig
from vqvae.data import (
    DataError,
    ImageDataset,
    ImageSource,
    ResumableBatchSampler,
    _HubRows,
    _identity,
    available_cpus,
    builtin_source,
    folder_source,
    hf_source,
    make_datasets,
    make_loader,
    split_source,
    usable_workers,
)


def save_image(path, mode: str, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    save_image(root / "a.jpg", "RGB")
    save_image(root / "b.png", "L")  # grayscale
    save_image(root / "nested" / "c.png", "RGBA")
    save_image(root / "nested" / "deeper" / "d.webp", "RGB")
    (root / "notes.txt").write_text("not an image, and not an image suffix either")
    (root / "broken.jpg").write_bytes(b"this is no jpeg")
    good = root / "e.png"
    save_image(good, "RGB")
    (root / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "empty.webp").write_bytes(b"")
    return root


def test_builtin_photographs_load_without_network():
    source = builtin_source()
    assert len(source) >= 8
    for i in range(len(source)):
        image = source.load(i)
        assert image.mode == "RGB" and min(image.size) >= 100


def test_folder_source_is_recursive_converts_to_rgb_and_skips_corrupt_files(image_folder, capsys):
    source = folder_source(str(image_folder))
    names = sorted(os.path.basename(p) for p in source.items)
    assert names == ["a.jpg", "b.png", "c.png", "d.webp", "e.png"]
    assert source.skipped == 3
    err = capsys.readouterr().err
    assert "skipped 3 unreadable image file(s) of 8" in err and "broken.jpg" in err
    dataset = ImageDataset(source, 16, 1.0, True, seed=0)
    for i in range(len(dataset)):
        x = dataset[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_a_file_that_fails_late_is_skipped_with_a_warning(tmp_path):
    save_image(tmp_path / "good.png", "RGB")
    save_image(tmp_path / "late.jpg", "RGB")
    source = folder_source(str(tmp_path))
    # corrupt one after the start-up check, as a file changed on disk mid-run would be
    path = [p for p in source.items if p.endswith("late.jpg")][0]
    with open(path, "r+b") as f:
        f.truncate(200)
    dataset = ImageDataset(source, 8, 1.0, False, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = torch.stack([dataset[i] for i in range(len(dataset))])
    assert batch.shape == (2, 3, 8, 8)
    assert any("late.jpg" in str(w.message) for w in caught)


def test_a_truncated_jpeg_is_counted_with_the_unreadable_files_at_start_up(tmp_path, capsys):
    save_image(tmp_path / "good.png", "RGB")
    save_image(tmp_path / "whole.jpg", "RGB", size=(64, 48))
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])  # the header parses; the scan data stops short
    source = folder_source(str(tmp_path))
    assert sorted(os.path.basename(p) for p in source.items) == ["good.png", "whole.jpg"]
    assert source.skipped == 1
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image file(s) of 3" in err and "cut.jpg" in err


def test_loading_leaves_no_file_open_even_when_decoding_fails(tmp_path):
    for name in ("good.png", "head.jpg", "body.jpg"):
        save_image(tmp_path / name, "RGB", size=(64, 48))
    source = folder_source(str(tmp_path))
    # both cut after the start-up check: one inside its header (Image.open fails), one inside its scan data
    for name, keep in (("head.jpg", 300), ("body.jpg", None)):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:keep or len(data) * 2 // 3])
    # the same files as hub rows stored by path (an undecoded datasets Image feature)
    rows = [{"image": {"bytes": None, "path": path}} for path in source.items]
    hub = ImageSource("hf:rows", _HubRows(rows, "image"), _identity)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for src in (source, hub):
            dataset = ImageDataset(src, 8, 1.0, False, seed=0)
            assert torch.stack([dataset[i] for i in range(len(dataset))]).shape == (3, 3, 8, 8)
        del dataset, src
        gc.collect()  # an unclosed file warns when it is collected
    skipped = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(skipped) == 4, skipped  # each bad file once per dataset
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="image folder not found: .*nowhere"):
        folder_source(str(tmp_path / "nowhere"))
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable jpg, png or webp images"):
        folder_source(str(tmp_path))


def test_unreachable_hub_dataset_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(source="hf", name="vqvae-triton-tests/no-such-dataset", cache_dir=str(tmp_path / "cache"))
    start = time.perf_counter()
    message = r"HF_HUB_OFFLINE is set and no cached copy.*--data\.source=folder --data\.path"
    with pytest.raises(DataError, match=message):
        hf_source(cfg)
    assert time.perf_counter() - start < 30


def test_samples_are_a_function_of_seed_epoch_and_index():
    source = builtin_source()
    dataset = ImageDataset(source, 24, 0.3, True, seed=5, length=50)
    again = ImageDataset(source, 24, 0.3, True, seed=5, length=50)
    assert torch.equal(dataset[(3, 7)], again[(3, 7)])
    assert not torch.equal(dataset[(3, 7)], dataset[(4, 7)])
    assert not torch.equal(dataset[(3, 7)], ImageDataset(source, 24, 0.3, True, seed=6, length=50)[(3, 7)])


def test_split_holds_out_whole_images_deterministically():
    source = builtin_source()
    train, val = split_source(source, 0.2, seed=1)
    assert len(val) >= 1 and len(train) + len(val) == len(source)
    assert not set(train.items) & set(val.items)
    assert split_source(source, 0.2, seed=1)[1].items == val.items


def test_batch_sampler_resumes_where_it_stopped_across_epochs():
    full = ResumableBatchSampler(10, 3, seed=4)  # 3 batches an epoch, the odd sample dropped
    it = iter(full)
    first = [next(it) for _ in range(8)]
    assert [k[0][0] for k in first] == [0, 0, 0, 1, 1, 1, 2, 2]  # epochs
    epoch0 = [i for b in first[:3] for _, i in b]
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    assert epoch0 != [i for b in first[3:6] for _, i in b]  # a fresh order each epoch
    resumed = iter(ResumableBatchSampler(10, 3, seed=4, start_batch=5))
    assert [next(resumed) for _ in range(3)] == first[5:8]
    with pytest.raises(DataError, match="fewer than one batch"):
        ResumableBatchSampler(2, 3, seed=0)


def test_loader_batches_do_not_depend_on_worker_count():
    cfg = DataConfig(image_size=16, crop_scale=0.5, samples_per_epoch=12, val_samples=4)
    train, val = make_datasets(cfg, seed=0)
    single = iter(make_loader(train, 4, num_workers=0, seed=0))
    multi = iter(make_loader(train, 4, num_workers=2, seed=0))
    for _ in range(4):  # past the end of the first epoch
        assert torch.equal(next(single), next(multi))
    val_batches = list(make_loader(val, 3, num_workers=0, train=False))
    assert [b.shape[0] for b in val_batches] == [3, 1]
    assert torch.equal(torch.cat(val_batches), torch.cat(list(make_loader(val, 3, 0, train=False))))


def test_loader_workers_are_capped_by_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # e.g. taskset or a container
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cpus() == 2 and usable_workers(4) == 2 and usable_workers(1) == 1 and usable_workers(0) == 0
    val = make_datasets(DataConfig(image_size=16, val_samples=4), seed=0)[1]
    assert make_loader(val, 2, num_workers=4, train=False).num_workers == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: the machine's count
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert available_cpus() == 3 and usable_workers(8) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undetermined"
    assert available_cpus() == 1


def _widths(source):
    return sorted(source.load(i).size[0] for i in range(len(source)))


def test_a_hub_dataset_is_read_offline_with_validation_held_out_of_its_split(hub_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(source="hf", name=str(hub_dataset()), image_size=16, val_fraction=0.34,
                     cache_dir=str(tmp_path / "cache"))
    train, val = make_datasets(cfg, seed=0)
    assert (len(train), len(val)) == (4, 2)
    assert sorted(_widths(train.source) + _widths(val.source)) == list(range(20, 26))  # the train split, once
    assert _widths(make_datasets(cfg, seed=0)[1].source) == _widths(val.source)  # the same hold-out every run
    assert all(train.source.load(i).mode == "RGB" for i in range(len(train.source)))  # grayscale converted
    batches = list(make_loader(val, 2, num_workers=0, train=False))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 16, 16)]
    assert float(batches[0].min()) >= -1 and float(batches[0].max()) <= 1


def test_a_hub_dataset_validates_on_its_own_split_and_reads_any_image_column(hub_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = hub_dataset(column="picture", splits={"train": 5, "validation": 3, "test": 2})
    cfg = DataConfig(source="hf", name=str(folder), image_key="picture", val_split="validation", image_size=16,
                     cache_dir=str(tmp_path / "cache"))
    train, val = make_datasets(cfg, seed=0)
    assert _widths(train.source) == [20, 21, 22, 23, 24] and _widths(val.source) == [40, 41, 42]
    assert next(iter(make_loader(train, 4, num_workers=0))).shape == (4, 3, 16, 16)
    with pytest.raises(DataError, match=r"\(split 'train'\) has no column 'image' \(data\.image_key\); its "
                                        r"columns are \['picture', 'text'\]"):
        hf_source(DataConfig(source="hf", name=str(folder), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError, match=r"could not load hub dataset .* split 'valid'|no cached copy"):
        make_datasets(DataConfig(source="hf", name=str(folder), image_key="picture", val_split="valid",
                                 cache_dir=str(tmp_path / "cache")), seed=0)


def test_builtin_validation_holds_out_a_region_of_every_photo():
    """Validation covers every photo's content (not one flat photo), in pixels that training never sees."""
    cfg = DataConfig(source="builtin", image_size=32, crop_scale=0.5)
    train, val = make_datasets(cfg, seed=0)
    photos = builtin_source()
    assert len(train.source) == len(val.source) == len(photos)
    for i in range(len(photos)):
        whole = np.asarray(photos.load(i))
        part_train, part_val = np.asarray(train.source.load(i)), np.asarray(val.source.load(i))
        h, w = whole.shape[:2]
        if w >= h:  # split along the long side, the last quarter held out
            assert part_train.shape[1] + part_val.shape[1] == w and part_val.shape[1] == w - round(0.75 * w)
            assert np.array_equal(np.concatenate([part_train, part_val], axis=1), whole)
        else:
            assert part_train.shape[0] + part_val.shape[0] == h
            assert np.array_equal(np.concatenate([part_train, part_val], axis=0), whole)
    # the validation crops come from every photo, so they vary: not one flat image
    crops = torch.stack([val[i] for i in range(len(val))])
    per_photo = crops.reshape(len(val), -1).std(dim=1)
    assert crops.mean(dim=(1, 2, 3)).std() > 0.1 and (per_photo > 0.02).float().mean() > 0.5


def test_the_hub_is_probed_once_for_a_dataset_s_two_splits(monkeypatch):
    import vqvae.data as data  # noqa: PLC0415

    calls = []

    def unreachable(address, timeout):
        calls.append(address)
        raise OSError("no route")

    monkeypatch.setattr(data.socket, "create_connection", unreachable)
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.vqvae-tests.invalid")
    data._can_connect.cache_clear()
    assert not data._hub_reachable() and not data._hub_reachable()
    assert calls == [("hub.vqvae-tests.invalid", 443)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read every time, before the probe
    assert not data._hub_reachable() and len(calls) == 1
    data._can_connect.cache_clear()
