import numpy as np
import pytest
import torch

from moetrain.data import DataError, MixtureDataset, PackedTokenDataset, load_index


def _entry(d):
    (entry,) = load_index(d)["sources"].values()
    return entry


def _raw_stream(d, split):
    index, entry = load_index(d), _entry(d)
    return np.concatenate([np.fromfile(d / entry["dir"] / s["file"], dtype=index["dtype"])
                           for s in entry["splits"][split]["shards"]]).astype(np.int64)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("seq_len", [1, 7, 64, 1000])
def test_items_are_shifted_windows_of_the_stream(tiny_prepared, split, seq_len):
    stream = _raw_stream(tiny_prepared, split)
    ds = PackedTokenDataset(tiny_prepared, split, seq_len)
    assert ds.num_tokens == stream.size and len(ds) == (stream.size - 1) // seq_len
    spans_shards = False
    bounds = np.cumsum([s["tokens"] for s in _entry(tiny_prepared)["splits"][split]["shards"]])
    for i in list(range(min(len(ds), 50))) + [len(ds) - 1]:
        item = ds[i]
        assert item.dtype == torch.long and item.shape == (seq_len + 1,)
        want = stream[i * seq_len : i * seq_len + seq_len + 1]
        np.testing.assert_array_equal(item.numpy(), want)
        inputs, targets = item[:-1], item[1:]
        np.testing.assert_array_equal(targets.numpy(), stream[i * seq_len + 1 : (i + 1) * seq_len + 1])
        np.testing.assert_array_equal(inputs.numpy(), stream[i * seq_len : (i + 1) * seq_len])
        spans_shards |= bool(((bounds > i * seq_len) & (bounds < i * seq_len + seq_len + 1)).any())
    if split == "train" and seq_len == 1000:
        assert spans_shards, "the test should cover windows across a shard boundary"
    idx = [len(ds) - 1, 0, 3 % len(ds), 0]
    batch = ds.get_batch(idx)
    assert batch.shape == (4, seq_len + 1) and batch.dtype == torch.long
    assert torch.equal(batch, torch.stack([ds[i] for i in idx]))


def test_every_token_is_a_target_once(tiny_prepared):
    ds = PackedTokenDataset(tiny_prepared, "train", 37)
    targets = torch.cat([ds[i][1:] for i in range(len(ds))])
    stream = _raw_stream(tiny_prepared, "train")
    np.testing.assert_array_equal(targets.numpy(), stream[1 : 1 + len(ds) * 37])


def test_bounds_and_errors(tiny_prepared):
    ds = PackedTokenDataset(tiny_prepared, "train", 64)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.get_batch([0, -1])
    with pytest.raises(DataError, match="split 'test'"):
        PackedTokenDataset(tiny_prepared, "test", 64)
    with pytest.raises(DataError, match="source 'web' is not in"):
        PackedTokenDataset(tiny_prepared, "train", 64, source="web")
    with pytest.raises(DataError, match="seq_len"):
        PackedTokenDataset(tiny_prepared, "train", 0)
    huge = PackedTokenDataset(tiny_prepared, "val", 10**7)
    assert len(huge) == 0
    assert ds.vocab_size == 384 and int(torch.cat([ds[i] for i in range(len(ds))]).max()) < 384


def test_mixture_dataset_indexes_the_sources_side_by_side(tiny_prepared, tmp_path):
    import shutil

    from moetrain.data.index import read_index
    from moetrain.data.prepare import _write_index

    # The same tokens under two source names (a prepared directory with two sources).
    d = tmp_path / "two"
    shutil.copytree(tiny_prepared, d)
    index = read_index(d)
    (name, entry), = index["sources"].items()
    index["sources"]["copy"] = dict(entry)
    _write_index(d, index)
    a, b = PackedTokenDataset(d, "train", 50, name), PackedTokenDataset(d, "train", 50, "copy")
    short = PackedTokenDataset(d, "val", 50, name)
    mix = MixtureDataset(d, "train", 50, [name, "copy"], weights=[3, 1])
    assert len(mix) == len(a) + len(b) and mix.sizes == [len(a), len(b)] and mix.weights == [3, 1]
    idx = [0, len(a) - 1, len(a), len(a) + 5, 2]
    assert torch.equal(mix.get_batch(idx), torch.stack([a[0], a[len(a) - 1], b[0], b[5], a[2]]))
    assert mix.locate(idx)[0].tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(IndexError):
        mix.get_batch([len(mix)])
    # An evaluation order maps positions to global indices.
    val = MixtureDataset(d, "val", 50, ["copy", name], order=np.array([len(short) + 1, 0]))
    assert torch.equal(val.get_batch([0, 1]), torch.stack([short[1], short[0]]))
    assert len(val) == 2
    with pytest.raises(DataError, match="holds 2 sources"):
        PackedTokenDataset(d, "train", 50)


def test_mixture_datasets_of_a_config(tiny_prepared):
    from moetrain.config.schema import DataConfig
    from moetrain.data import mixture_datasets

    cfg = DataConfig(seq_len=50)
    (name,) = load_index(tiny_prepared)["sources"]
    cfg.corpus = "/anywhere/" + name  # the source's name is all that is looked up
    train, val = mixture_datasets(tiny_prepared, cfg, eval_batches=2)
    assert train.names == [name] and len(train) == len(PackedTokenDataset(tiny_prepared, "train", 50))
    assert val.order is None and len(val) == len(PackedTokenDataset(tiny_prepared, "val", 50))
    assert mixture_datasets(tiny_prepared, cfg, eval_batches=0)[1] is None
