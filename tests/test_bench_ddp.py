"""fastft-bench ddp: the bytes each collective of the real step moves (2 gloo processes, tiny images), and the
scaling model they feed."""
import json

import pytest

from conftest import tiny_overrides
from fastft.bench.cli import main
from fastft.bench.scaling import Cluster, Collective, predict
from fastft.config import load_config
from fastft.encoder import Encoder


def test_ddp_mode_counts_what_each_collective_moves(tmp_path, data_cache, capsys):
    ov = tiny_overrides(tmp_path / "unused", data_cache, **{"loader.batch_size": 8, "model.queue_size": 32})
    out = tmp_path / "ddp.json"
    argv = ["ddp", "--config", "configs/demo.yaml", "--world", "2", "--steps", "2", "--warmup", "1",
            "--key-bn", "shuffle,shuffle_gather", "--json", str(out), *ov]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    ddp = json.loads(out.read_text())["results"]["ddp"]
    images = 8 * 3 * 8 * 8 * 4  # one local batch of fp32 key images
    assert ddp["image_batch_bytes"] == images
    a2a, gather = (ddp["key_bn"][k]["collectives"] for k in ("shuffle", "shuffle_gather"))

    # The gather path receives the other rank's whole batch; all-to-all only the rows this rank encodes.
    assert gather["all_gather: all_gather_cat < batch_shuffle"]["received"] == (2 - 1) * images
    sent = a2a["all_to_all_single: _exchange < shuffle_a2a"]
    assert sent["payload"] == images and 0 < sent["received"] <= images
    shuffle_total = sum(c["received"] for label, c in a2a.items() if "shuffle" in label)
    assert shuffle_total <= 2 * images
    assert "all_to_all_single: _exchange < unshuffle_a2a" in a2a and not any("batch_shuffle" in k for k in a2a)

    # DDP's gradient all-reduce: every trainable parameter once per step, the ring's 2 (W - 1) / W of it.
    cfg = load_config("configs/demo.yaml", ov)
    grad_bytes = sum(p.numel() * 4 for p in Encoder(cfg.model).parameters())
    ddp_ar = a2a["gradient all-reduce (DDP, overlaps backward)"]
    assert ddp_ar["calls"] * ddp_ar["payload"] == pytest.approx(grad_bytes)
    assert ddp_ar["received"] == pytest.approx(2 * (2 - 1) / 2 * grad_bytes)
    assert 0 < ddp_ar["last_bucket"] <= grad_bytes
    for key_bn in ("shuffle", "shuffle_gather"):
        for w in (8, 64, 256):
            assert f"| {key_bn} | {w} |" in printed


def test_bytes_per_rank_follow_each_collectives_law():
    assert Collective("g", "all_gather", 1, 100, 4).bytes_at(64) == 63 * 100
    assert Collective("a", "all_to_all", 1, 100, 4).bytes_at(64) == pytest.approx(100 * 63 / 64)
    assert Collective("r", "all_reduce", 1, 100, 4).bytes_at(64) == pytest.approx(2 * 100 * 63 / 64)
    # the shuffle's permutation covers the global batch: 16x the ranks, 16x the bytes; 4x the batch, 4x again
    perm = Collective("p", "broadcast", 1, 800, 4, per_sample=True)
    assert perm.bytes_at(64) == 800 * 16 and perm.bytes_at(64, batch_scale=4) == 800 * 16 * 4
    assert Collective("s", "all_reduce", 1, 100, 4).bytes_at(1) == 0
    with pytest.raises(ValueError, match="not one of"):
        Collective("x", "gossip", 1, 1, 2)


def test_gradient_all_reduce_hides_behind_backward_but_for_its_last_bucket():
    cluster = Cluster(images_per_s=1000.0, net_bytes_per_s=1e9, net_latency_s=0.0, backward_share=0.5)
    # 32 images: a 32 ms step, 16 ms of backward. 4 buckets of 1 MB: 2 * 63/64 * 4 MB at 1 GB/s = 7.9 ms.
    short = [Collective("ddp", "ddp_all_reduce", 4, 1e6, 2, last_bucket=1e6)]
    p = predict(short, 64, 32, cluster)
    assert p.exposed_s == pytest.approx(7.875e-3 / 4)  # only the last bucket outlasts backward
    long = [Collective("ddp", "ddp_all_reduce", 4, 4e6, 2, last_bucket=4e6)]
    assert predict(long, 64, 32, cluster).exposed_s == pytest.approx(4 * 7.875e-3 - 16e-3)
    blocking = [Collective("gather", "all_gather", 1, 1e6, 2)]
    assert predict(blocking, 64, 32, cluster).exposed_s == pytest.approx(63e-3)  # nothing hides a gather
    assert predict(blocking, 64, 32, cluster).efficiency == pytest.approx(32 / (32 + 63))


def test_readme_assumptions_all_to_all_scales_and_the_gather_does_not():
    """ResNet-50 + MLP head (28.0 M parameters in fastft's 10 MB DDP buckets, the last one 1.9 MB), 32 images of
    224 per GPU: the shuffle's traffic as each path issues it, on the documented cluster (NVLink in a node,
    50 GB/s per GPU between nodes, 2,800 images/s)."""
    images, keys, grads = 32 * 3 * 224 * 224 * 4, 32 * 128 * 4, 28.0e6 * 4
    common = [Collective("ddp", "ddp_all_reduce", 10, grads / 10, 4, last_bucket=1.9e6),
              Collective("enqueue", "all_gather", 1, keys, 4, per_sample=True),
              Collective("perm", "broadcast", 1, 8 * 4 * 32, 4, per_sample=True)]
    a2a = common + [Collective("images", "all_to_all", 1, images, 4, per_sample=True),
                    Collective("keys", "all_to_all", 1, keys, 4, per_sample=True)]
    gather = common + [Collective("images", "all_gather", 1, images, 4, per_sample=True),
                       Collective("keys", "all_gather", 1, keys, 4, per_sample=True)]
    assert predict(a2a, 64, 32).efficiency >= 0.9
    assert predict(gather, 64, 32).efficiency < 0.5
    assert predict(a2a, 256, 32).bytes_per_rank < predict(gather, 8, 32).bytes_per_rank * 2


def test_ddp_mode_refuses_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ddp", "--config", "configs/demo.yaml", "--key-bn", "shuffle,gossip"])
    assert e.value.code == 2 and "'gossip' is not a model.key_bn" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["ddp", "--config", "configs/demo.yaml", "--world", "1"])
    assert e.value.code == 2 and "--world 1" in capsys.readouterr().err
