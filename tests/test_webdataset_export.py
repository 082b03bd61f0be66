"""Image-text batch plans exported as WebDataset tars in plan order, read back by webdataset and open_clip."""

from __future__ import annotations

import functools
import io
import json
import tarfile
from argparse import Namespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import query
from pipeline.cli import main
from pipeline.curate.webdataset_export import (
    export_plan,
    plan_order_dataset,
    plan_order_shards,
)
from pipeline.select.cabs_sampler import rank_share
from pipeline.stages.ingest import run_ingest


def _dreambooth_with_concepts(tmp, demo_data):
    """The 21 dreambooth images ingested into ``tmp/cat`` as dataset ``db``, and a concept file (the
    caption's words) beside it; (catalog root, concept file, samples in sample-id order)."""
    root = tmp / "cat"
    run_ingest([str(demo_data / "image_text" / "dreambooth" / "images")], root, "db", kind="image_text",
               container="image_folder", options={"caption_from": "dirname"})
    samples = query.run_query(root, "SELECT sample_id, caption FROM image_samples ORDER BY sample_id").to_pylist()
    src = tmp / "concepts.parquet"
    pq.write_table(pa.table({"sample_id": [s["sample_id"] for s in samples],
                             "concepts": [s["caption"].split() for s in samples]}), src)
    return root, src, samples


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, demo_data):
    """The 21 dreambooth images ingested, their concept file, and a 2-step and a 5-step CABS plan of 10 a step."""
    tmp = tmp_path_factory.mktemp("wds")
    root, src, samples = _dreambooth_with_concepts(tmp, demo_data)
    plans = {}
    for steps in (2, 5):
        plans[steps] = tmp / f"plan{steps}.parquet"
        assert main(["select", "cabs", "--input", str(src), "--superbatch", "20", "--filter-ratio", "0.5",
                     "--steps", str(steps), "--out", str(plans[steps])]) == 0
    return {"root": root, "src": src, "plans": plans, "caption_of": {s["sample_id"]: s["caption"] for s in samples}}


def _plan_steps(plan) -> list[list[str]]:
    """The plan's batches: sample ids per step, in (step, position) order."""
    rows = sorted(pq.read_table(plan).to_pylist(), key=lambda r: (r["step"], r["position"]))
    steps: dict[int, list[str]] = {}
    for r in rows:
        steps.setdefault(r["step"], []).append(r["sample_id"])
    return list(steps.values())


def _keys(tar_path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return list(dict.fromkeys(n.split(".", 1)[0] for n in tar.getnames()))


def test_plan_to_webdataset_shards(tmp_path, catalog):
    plan = catalog["plans"][2]
    out = tmp_path / "wds"
    assert main(["export", "--catalog", str(catalog["root"]), "--format", "webdataset", "--plan", str(plan),
                 "--dataset", "db", "--out", str(out), "--samples-per-shard", "7"]) == 0
    manifest = json.loads((out / ".manifest.json").read_text())
    # 2 steps of 10: 7 per shard needs 2 parts a step, 8 shards (open_clip's 4 workers x 2 GPUs) need 4.
    assert manifest["samples"] == 20 and manifest["missing_from_dataset"] == 0
    assert manifest["shards_per_step"] == 4 and len(manifest["shards"]) == 8 and manifest["warnings"] == []
    assert manifest["train_data"] == "shard-{000000..000007}.tar"
    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sizes) == manifest["shards"] and sum(sizes.values()) == 20
    assert int((out / "__len__").read_text()) == 20
    plan_rows = pq.read_table(plan).to_pylist()
    seen = []
    for i, shard in enumerate(manifest["shards"]):
        with tarfile.open(out / shard) as tar:
            keys = list(dict.fromkeys(n.split(".", 1)[0] for n in tar.getnames()))
            assert len(keys) == sizes[shard] == manifest["shard_steps"][i]["samples"]
            steps_here = set()
            for key in keys:
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                caption = tar.extractfile(f"{key}.txt").read().decode()
                Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())).load()
                assert caption == catalog["caption_of"][meta["sample_id"]]
                assert key == f"{meta['step']:06d}_{meta['position']:06d}"
                steps_here.add(meta["step"])
                seen.append((meta["step"], meta["position"], meta["sample_id"]))
            assert steps_here == {manifest["shard_steps"][i]["step"]}  # a shard never straddles a step
    assert seen == [(r["step"], r["position"], r["sample_id"]) for r in plan_rows]


def test_selection_in_the_catalog_to_webdataset_with_lineage(tmp_path, demo_data):
    root, src, _ = _dreambooth_with_concepts(tmp_path, demo_data)
    assert main(["select", "cabs", "--catalog", str(root), "--input", str(src), "--name", "plan2",
                 "--superbatch", "20", "--filter-ratio", "0.5", "--steps", "2"]) == 0
    report = json.loads((root / "selections" / "plan2" / "report.json").read_text())
    out = tmp_path / "wds"
    assert main(["export", "--catalog", str(root), "--format", "webdataset", "--selection", "plan2",
                 "--dataset", "db", "--out", str(out)]) == 0
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["samples"] == 20 and manifest["parameters"]["selection_run_id"] == report["run_id"]
    assert len(manifest["shards"]) == 8 and manifest["parameters"]["min_shards"] == 8
    runs = query.run_query(root, "SELECT stage, status, dataset FROM runs WHERE stage IN ('select', 'export') "
                                 "ORDER BY stage").to_pylist()
    assert runs == [{"stage": "export", "status": "succeeded", "dataset": "db"},
                    {"stage": "select", "status": "succeeded", "dataset": "file"}]
    assert main(["export", "--catalog", str(root), "--format", "webdataset", "--dataset", "db",
                 "--out", str(tmp_path / "x")]) == 2  # neither --selection nor --plan


def test_card_and_manifest_and_the_datasets_loader(tmp_path, catalog):
    """The shared export card: README.md configs name the shards, .manifest.json has their sha256."""
    out = tmp_path / "wds"
    m = export_plan(catalog["root"], "db", catalog["plans"][2], out)
    assert json.loads((out / ".manifest.json").read_text()) == json.loads(json.dumps(m))
    assert not (out / "manifest.json").exists()
    assert [(f["path"], f["samples"]) for f in m["data_files"]] == [(s, 20 // 8 + (i % 4 < 2)) for i, s in
                                                                      enumerate(m["shards"])]
    assert all(len(f["sha256"]) == 64 for f in m["data_files"])
    assert sum(s["rows"] for s in m["inputs"]["sources"]) == 20
    card = (out / "README.md").read_text()
    assert "shard-*.tar" in card.split("---")[1] and m["train_data"] in card
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 20 and [r["json"]["sample_id"] for r in ds] == \
        [i for step in _plan_steps(catalog["plans"][2]) for i in step]
    assert sorted(ds.column_names) == ["__key__", "__url__", "jpg", "json", "txt"]


def test_shard_layout_options_and_limits(tmp_path, catalog):
    root, plan = catalog["root"], catalog["plans"][2]
    # min_shards=1 and the default 1000 a shard: one shard a step, as before this layout.
    m = export_plan(root, "db", plan, tmp_path / "a", min_shards=1)
    assert m["shards_per_step"] == 1 and len(m["shards"]) == 2
    assert m["warnings"] == [] and m["train_data"] == "shard-{000000..000001}.tar"
    # more shards than the smallest step has samples would mean empty shards: capped, and said so.
    m = export_plan(root, "db", plan, tmp_path / "b", min_shards=64)
    assert m["shards_per_step"] == 10 and len(m["shards"]) == 20 and "min_shards 64" in m["warnings"][0]
    assert set(json.loads((tmp_path / "b" / "sizes.json").read_text()).values()) == {1}
    with pytest.raises(ValueError, match="between 1 and the smallest step's 10 samples"):
        export_plan(root, "db", plan, tmp_path / "c", shards_per_step=11)
    with pytest.raises(ValueError, match="must be >= 1"):
        export_plan(root, "db", plan, tmp_path / "c", samples_per_shard=0)
    m = export_plan(root, "db", plan, tmp_path / "d", shards_per_step=3)
    assert [len(_keys(tmp_path / "d" / s)) for s in m["shards"]] == [4, 3, 3, 4, 3, 3]  # np.array_split sizes


def test_webdataset_library_reads_the_export_in_plan_order(tmp_path, catalog):
    wds = pytest.importorskip("webdataset")
    plan = catalog["plans"][5]
    out = tmp_path / "wds"
    m = export_plan(catalog["root"], "db", plan, out)
    assert m["shards_per_step"] == 2 and len(m["shards"]) == 10  # 5 steps, >= 8 shards
    urls = [str(out / s) for s in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "txt", "json")
    got = [(meta["step"], meta["sample_id"], txt, img.size) for img, txt, meta in ds]
    plan_rows = sorted(pq.read_table(plan).to_pylist(), key=lambda r: (r["step"], r["position"]))
    assert [(s, i) for s, i, _, _ in got] == [(r["step"], r["sample_id"]) for r in plan_rows]  # each once, in order
    assert all(txt == catalog["caption_of"][i] and min(size) > 0 for _, i, txt, size in got)


def _tag_worker(sample):
    from torch.utils.data import get_worker_info

    return {"worker": get_worker_info().id, "url": sample["__url__"]}


def test_every_worker_gets_shards_with_the_default_shard_count(tmp_path, catalog):
    """With open_clip's default 4 workers and webdataset's split_by_worker, no worker is idle."""
    wds = pytest.importorskip("webdataset")
    from torch.utils.data import DataLoader

    out = tmp_path / "wds"
    m = export_plan(catalog["root"], "db", catalog["plans"][2], out)  # 2 steps: 8 shards by default
    ds = wds.DataPipeline(wds.SimpleShardList([str(out / s) for s in m["shards"]]), wds.split_by_worker,
                          wds.tarfile_to_samples(), wds.map(_tag_worker))
    seen = list(DataLoader(ds, batch_size=None, num_workers=4))
    per_worker = {w: sum(1 for s in seen if s["worker"] == w) for w in range(4)}
    assert all(n > 0 for n in per_worker.values()) and sum(per_worker.values()) == 20, per_worker
    assert all(len({s["url"] for s in seen if s["worker"] == w}) == 2 for w in range(4))


@pytest.mark.parametrize("workers", [0, 3])
def test_plan_order_dataset_yields_the_plan_batches(tmp_path, catalog, workers):
    from torch.utils.data import DataLoader

    plan = catalog["plans"][5]
    out = tmp_path / "wds"
    export_plan(catalog["root"], "db", plan, out)  # 2 shards a step: one rank reads both, as one batch
    loader = DataLoader(plan_order_dataset(out, map_sample=_sample_id), batch_size=None, num_workers=workers)
    assert [list(b) for b in loader] == _plan_steps(plan)
    for epoch in range(2):  # no shuffling: every pass is the plan again
        assert [list(b) for b in loader] == _plan_steps(plan)


def _sample_id(sample):
    return sample["json"]["sample_id"]


def test_plan_order_per_rank_is_its_rank_share(tmp_path, catalog):
    from torch.utils.data import DataLoader

    plan = catalog["plans"][5]
    out = tmp_path / "wds"
    export_plan(catalog["root"], "db", plan, out, shards_per_step=2)
    steps = _plan_steps(plan)
    per_rank = [[list(b) for b in DataLoader(plan_order_dataset(out, rank, 2, decode=None,
                                                                map_sample=_raw_sample_id),
                                             batch_size=None, num_workers=2)] for rank in range(2)]
    assert all(len(batches) == len(steps) for batches in per_rank)  # every rank gets every step, as DDP needs
    for k, batch in enumerate(steps):
        shares = [per_rank[r][k] for r in range(2)]
        assert shares == [rank_share(np.array(batch), r, 2).tolist() for r in range(2)]
        assert shares[0] + shares[1] == batch  # disjoint, together the step
    assert len(plan_order_shards(out, 0, 1)[0]) == 2  # one process reads both parts of a step
    with pytest.raises(ValueError, match="shards_per_step=3"):
        plan_order_shards(out, 0, 3)


def _raw_sample_id(sample):
    return json.loads(sample["json"])["sample_id"]


def test_open_clip_trains_on_the_export_without_train_num_samples(tmp_path, catalog, monkeypatch):
    data = pytest.importorskip("open_clip_train.data", reason="open_clip_train (open-clip-torch[training]) "
                                                               "is not installed")
    import torch
    import webdataset
    from webdataset.tariterators import tar_file_expander

    if tuple(int(x) for x in webdataset.__version__.split(".")[:3]) > (0, 2, 86):
        # open-clip-torch[training] pins webdataset<=0.2.86: later ones end every shard with an EOF
        # marker {} that open_clip's group_by_keys_nothrow reads as a file (KeyError 'fname',
        # mlfoundations/open_clip#935). The fix named there: no marker. Patched before the
        # DataLoader forks, so the workers see it too.
        monkeypatch.setattr(data, "tar_file_expander", functools.partial(tar_file_expander, eof_value=None))
    out = tmp_path / "wds"
    m = export_plan(catalog["root"], "db", catalog["plans"][2], out)
    args = Namespace(train_data=str(out / m["train_data"]), val_data=None, train_num_samples=None,
                     dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=4,
                     workers=4, world_size=1)

    def preprocess(img):
        return torch.from_numpy(np.asarray(img.convert("RGB").resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)

    def tokenizer(texts):
        return torch.tensor([[len(t) for t in ([texts] if isinstance(texts, str) else texts)]])

    info = data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    # sizes.json gave the 20 samples; open_clip rounds up to whole batches on every worker.
    assert info.dataloader.num_batches == 8 and info.dataloader.num_samples == 32
    images, texts = next(iter(info.dataloader))
    assert images.shape == (4, 3, 16, 16) and texts.shape[0] == 4
    # one shard a step (the layout before min_shards): open_clip refuses 4 workers on 2 shards.
    old = tmp_path / "old"
    m = export_plan(catalog["root"], "db", catalog["plans"][2], old, min_shards=1)
    args.train_data = str(old / m["train_data"])
    with pytest.raises(AssertionError, match="number of shards must be >= total workers"):
        data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)


def test_docs_training_loop_runs_on_the_plan_batches(tmp_path, catalog):
    """docs/webdataset.md's loop (a tiny open_clip CLIP): one optimiser step per planned step, in order."""
    open_clip = pytest.importorskip("open_clip")
    import torch
    from torch.utils.data import DataLoader

    from pipeline.embed.clip import register_tiny_config

    plan = catalog["plans"][5]
    out = tmp_path / "wds"
    export_plan(catalog["root"], "db", plan, out)
    name = register_tiny_config()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2)

    def to_pair(sample):
        image = next(sample[k] for k in ("jpg", "png", "jpeg", "webp") if k in sample)
        return preprocess(image), sample["txt"]

    def collate(batch):
        images, captions = zip(*batch)
        return torch.stack(images), tokenizer(list(captions))

    loader = DataLoader(plan_order_dataset(out, map_sample=to_pair), batch_size=None, num_workers=2,
                        collate_fn=collate)
    captions = [[catalog["caption_of"][i] for i in step] for step in _plan_steps(plan)]
    losses = []
    for (images, texts), step_captions in zip(loader, captions, strict=True):
        assert images.shape[0] == len(step_captions) == 10
        assert torch.equal(texts, tokenizer(step_captions))  # this step's captions, in plan order
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(losses) == 5 and all(np.isfinite(losses))
