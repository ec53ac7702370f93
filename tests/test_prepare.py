"""The shard-writing pipeline (`babygpt/prepare.py`, `prepare.py`): order, boundaries, resume, readers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from babygpt.config import BabyGPTError, load_config
from babygpt.data import TokenWindows, read_meta
from babygpt.prepare import (
    document_tokens,
    parse_count,
    read_jsonl,
    read_parquet,
    read_text_files,
    tokenize_stream,
    write_dataset,
)
from babygpt.run import plan_batch
from babygpt.tokenizer import EOT, asset_path

ROOT = Path(__file__).resolve().parents[1]
SHARD = 1000  # tokens: small enough that the corpus below (~16k tokens) spans many shards


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """~300 Shakespeare passages of uneven length (some longer than a shard, some empty)."""
    text = Path(asset_path("shakespeare", "input.txt")).read_text(encoding="utf-8")[:200_000]
    docs = text.split("\n\n")
    return docs[:150] + ["", text[:12_000]] + docs[150:300]


@pytest.fixture(scope="module")
def serial_stream(documents) -> np.ndarray:
    """The reference token stream: each document's tokens, one after the other, in one process."""
    return np.concatenate([document_tokens(d) for d in documents])


def read_shards(data_dir: Path) -> list[np.ndarray]:
    """Every shard in stream order: val_000000 first, then train_000001, ..."""
    files = sorted(data_dir.glob("*_[0-9]*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    return [np.load(f) for f in files]


def snapshot(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir())}


def test_parallel_tokenization_equals_serial(documents, serial_stream):
    parallel = list(tokenize_stream(documents, workers=2))
    assert len(parallel) == len(documents)
    assert all(t[0] == EOT and t.dtype == np.uint16 for t in parallel)
    np.testing.assert_array_equal(np.concatenate(parallel), serial_stream)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, documents) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "corpus"
    write_dataset(documents, out, source="test corpus", shard_tokens=SHARD, workers=2)
    return out


def test_shards_partition_the_stream_without_loss_or_duplication(prepared, serial_stream):
    shards = read_shards(prepared)
    assert [p.name for p in sorted(prepared.glob("val_*.npy"))] == ["val_000000.npy"]
    assert len(shards) == -(-len(serial_stream) // SHARD) >= 5
    assert all(len(s) == SHARD for s in shards[:-1]) and 0 < len(shards[-1]) <= SHARD
    assert all(s.dtype == np.uint16 for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards), serial_stream)
    meta = read_meta(prepared)
    assert meta["complete"] and meta["val_tokens"] == SHARD
    assert meta["train_tokens"] + meta["val_tokens"] == len(serial_stream)


def test_rerun_resumes_missing_shards_to_identical_output(tmp_path, prepared, documents):
    out = tmp_path / "corpus"
    shutil.copytree(prepared, out)
    reference = snapshot(out)
    shards = sorted(out.glob("train_*.npy"))
    # A killed run: the last shard and one in the middle missing, a writer's temporary left behind.
    shards[-1].unlink()
    shards[2].unlink()
    (out / f".{shards[-1].name}.abc123.tmp").write_bytes(b"partial")
    meta = read_meta(out)
    meta.update(complete=False)
    (out / "meta.json").write_text(json.dumps(meta))
    write_dataset(documents, out, source="test corpus", shard_tokens=SHARD, workers=1)
    assert snapshot(out) == reference
    # Without any progress record the stream is recomputed from the start; the result is the same.
    (out / "meta.json").unlink()
    shards[-2].unlink()
    write_dataset(documents, out, source="test corpus", shard_tokens=SHARD, workers=2)
    assert snapshot(out) == reference


def test_rerun_with_other_settings_is_refused(tmp_path, prepared, documents):
    out = tmp_path / "corpus"
    shutil.copytree(prepared, out)
    with pytest.raises(BabyGPTError, match="other settings.*shard_tokens"):
        write_dataset(documents, out, source="test corpus", shard_tokens=SHARD + 1)


def test_killed_prepare_leaves_no_partial_shard_and_resumes(tmp_path, documents, prepared):
    """SIGKILL the CLI mid-way (documents arrive through a pipe, so the kill point is known)."""
    lines = [json.dumps({"text": d}) + "\n" for d in documents]
    corpus = tmp_path / "corpus.jsonl"
    os.mkfifo(corpus)
    command = [sys.executable, str(ROOT / "prepare.py"), "--data-dir", str(tmp_path / "data"), "jsonl"]
    options = [str(corpus), "--name", "corpus", "--shard-tokens", str(SHARD), "--workers", "1"]
    proc = subprocess.Popen([*command, *options], cwd=tmp_path, stderr=subprocess.PIPE)
    out = tmp_path / "data" / "corpus"
    try:
        with open(corpus, "w") as pipe:
            pipe.writelines(lines[: len(lines) // 2])
            pipe.flush()
            deadline = time.monotonic() + 60
            while not (out / "train_000003.npy").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
    except BrokenPipeError:
        pass
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    written = read_shards(out)
    assert len(written) >= 4
    np.testing.assert_array_equal(
        np.concatenate(written), np.concatenate(read_shards(prepared))[: sum(map(len, written))]
    )
    assert not read_meta(out)["complete"]

    corpus.unlink()
    corpus.write_text("".join(lines))
    done = subprocess.run([*command, *options], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert {k: v for k, v in snapshot(out).items() if k != "meta.json"} == {
        k: v for k, v in snapshot(prepared).items() if k != "meta.json"
    }
    assert read_meta(out)["shards"] == read_meta(prepared)["shards"]


def test_small_corpus_is_split_into_val_and_train(tmp_path, documents, serial_stream):
    out = tmp_path / "small"
    meta = write_dataset(documents, out, source="small", shard_tokens=10**9, val_fraction=0.1)
    val, train = read_shards(out)
    assert len(val) == int(0.1 * len(serial_stream))
    np.testing.assert_array_equal(np.concatenate([val, train]), serial_stream)
    assert (meta["val_tokens"], meta["train_tokens"]) == (len(val), len(train))


def test_jsonl_parquet_and_text_readers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first document", "second one\nwith a newline", "", "é ünïcode ✓"]
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:2]))
    )
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[2:]) + "\n\n")
    assert list(read_jsonl([tmp_path / "a.jsonl"])) == docs[:2]
    assert list(read_jsonl([tmp_path / "b.jsonl"], field="body")) == docs[2:]
    with pytest.raises(BabyGPTError, match=r"b.jsonl:1: no string field 'text'"):
        list(read_jsonl([tmp_path / "b.jsonl"]))

    pq.write_table(pa.table({"text": docs, "n": list(range(4))}), tmp_path / "c.parquet", row_group_size=3)
    assert list(read_parquet([tmp_path / "c.parquet", tmp_path / "c.parquet"])) == docs + docs
    with pytest.raises(BabyGPTError, match="no column 'content'"):
        read_parquet([tmp_path / "c.parquet"], field="content")

    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8")
    assert list(read_text_files([tmp_path / f"{i}.txt" for i in range(4)])) == docs
    with pytest.raises(BabyGPTError, match="no such file"):
        read_text_files([tmp_path / "missing.txt"])


def _huge_ids(text: str) -> list[int]:
    return [len(text), 70_000]


def test_token_ids_beyond_uint16_are_refused(tmp_path):
    with pytest.raises(BabyGPTError, match="does not fit in uint16"):
        write_dataset(["a", "b"], tmp_path / "big", source="big", encode=_huge_ids)
    assert not list((tmp_path / "big").glob("*.npy"))


def test_parse_count():
    assert [parse_count(s) for s in ("100M", "10k", "1_000", "2e6", "3B")] == [
        10**8,
        10**4,
        1000,
        2 * 10**6,
        3 * 10**9,
    ]
    with pytest.raises(BabyGPTError, match="100M"):
        parse_count("lots")


def test_cli_prepares_parquet_and_reports_errors_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one document", "and another"] * 50}), tmp_path / "d.parquet")
    base = [
        sys.executable,
        str(ROOT / "prepare.py"),
        "--data-dir",
        str(tmp_path),
        "parquet",
        str(tmp_path / "d.parquet"),
    ]
    ok = subprocess.run(
        [*base, "--name", "pq", "--text-field", "content", "--workers", "2"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == [
        "meta.json",
        "train_000001.npy",
        "val_000000.npy",
    ]
    bad = subprocess.run([*base, "--name", "pq2"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--text-field" in bad.stderr


def test_both_backends_load_a_multi_shard_prepared_dataset(prepared):
    """The loaders read a pipeline-made dataset by name; every window is a slice of one shard."""
    from babygpt_jax.data import make_loaders as jax_loaders
    from babygpt_torch.data import make_loaders as torch_loaders

    config = load_config(
        None,
        [
            "model.block_size=64",
            "train.micro_batch_size=4",
            f"data.data_dir={prepared.parent}",
            f"data.dataset={prepared.name}",
        ],
    )
    plan = plan_batch(config, devices=1)
    torch_train, torch_val = torch_loaders(config, plan, rank=0)
    jax_train, jax_val = jax_loaders(config, plan, process_index=0, local_devices=1)
    train_shards = [np.load(p) for p in sorted(prepared.glob("train_*.npy"))]
    assert len(torch_train.windows.shards) == len(train_shards) > 4

    seen = set()
    for _ in range(20):
        (x,), (y,) = torch_train.next_batch()  # one step of one micro-batch
        jx, jy = jax_train.next_batch()
        np.testing.assert_array_equal(x.numpy(), jx[0])
        np.testing.assert_array_equal(y.numpy(), jy[0])
        for row in np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1):
            hits = [i for i, s in enumerate(train_shards) if _contains(s, row)]
            assert hits, "a window that is not a slice of any train shard"
            seen.update(hits)
    assert len(seen) > 1  # the shuffled order visits several shards

    val = np.load(prepared / "val_000000.npy")
    (x,), (y,) = torch_val.next_batch()
    np.testing.assert_array_equal(x.numpy()[0], val[:64])  # validation reads its shard in file order
    np.testing.assert_array_equal(y.numpy()[0], val[1:65])
    assert isinstance(torch_val.windows, TokenWindows)
    np.testing.assert_array_equal(jax_val.next_batch()[0][0], x.numpy())


def _contains(shard: np.ndarray, row: np.ndarray) -> bool:
    starts = np.flatnonzero(shard[: len(shard) - len(row) + 1] == row[0])
    return any(np.array_equal(shard[s : s + len(row)], row) for s in starts)
