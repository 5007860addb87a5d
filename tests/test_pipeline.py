"""grain pipelines: process-count invariance, epochs, resume, padded eval passes."""

import itertools
import json
import math
import threading

import numpy as np
import pytest

from geotoken_jax import s2
from geotoken_jax.data import earth, pipeline

NUM_RECORDS = 50  # not a multiple of the batch sizes below: batches straddle epochs
GLOBAL_BATCH = 8


class ToySource:
  """An in-memory source with the EarthSource record layout; logs what is read."""

  def __init__(self, num_records=NUM_RECORDS, vectorized=True):
    self.num_records = num_records
    self.reads = []  # one entry per load: the rows asked for
    self._lock = threading.Lock()  # grain reads on prefetch threads
    if not vectorized:
      self.get_batch = None

  def __len__(self):
    return self.num_records

  def _record(self, row):
    return {
        "image": np.full((4, 4, 3), row % 256, np.uint8),
        "tokens": np.full((3,), row, np.int32),
        "latlng": np.array([row, -row], np.float32),
        "id": np.int64(row),
    }

  def __getitem__(self, row):
    with self._lock:
      self.reads.append((int(row),))
    return self._record(int(row))

  def get_batch(self, rows):
    with self._lock:
      self.reads.append(tuple(np.asarray(rows).tolist()))
    records = [self._record(int(r)) for r in rows]
    return {key: np.stack([r[key] for r in records]) for key in records[0]}


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def global_ids(process_count, num_batches, seed=0, source_factory=ToySource):
  """Global batches' ids: process batches concatenated in process order."""
  per_process = []
  for p in range(process_count):
    it = pipeline.train_iterator(source_factory(), global_batch_size=GLOBAL_BATCH, seed=seed,
                                 process_index=p, process_count=process_count)
    batches = take(it, num_batches)
    for batch in batches:
      assert batch["image"].shape == (GLOBAL_BATCH // process_count, 4, 4, 3)
      assert batch["image"].dtype == np.uint8
      np.testing.assert_array_equal(batch["tokens"][:, 0], batch["id"])
    per_process.append([b["id"] for b in batches])
  return np.stack([np.concatenate([per_process[p][k] for p in range(process_count)])
                   for k in range(num_batches)])  # [batches, G]


def test_global_batches_do_not_depend_on_process_count():
  num_batches = 20  # 160 positions: 3.2 epochs of 50
  reference = global_ids(1, num_batches)
  for process_count in (2, 4):
    np.testing.assert_array_equal(global_ids(process_count, num_batches), reference)


def test_epochs_cover_every_record_once_in_a_new_order():
  stream = global_ids(1, 25).ravel()  # 200 positions = 4 epochs
  epochs = stream.reshape(4, NUM_RECORDS)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_RECORDS))
  assert len({tuple(e) for e in epochs}) == 4  # every epoch has its own order
  assert not np.array_equal(epochs[0], np.arange(NUM_RECORDS))  # shuffled at all
  # Batch 6 (positions 48..55) holds the last 2 of epoch 1 then the first 6 of epoch 2.
  batch6 = stream[48:56]
  np.testing.assert_array_equal(batch6[:2], epochs[0][48:])
  np.testing.assert_array_equal(batch6[2:], epochs[1][:6])


def test_seed_determines_the_order():
  np.testing.assert_array_equal(global_ids(1, 10, seed=7), global_ids(1, 10, seed=7))
  assert not np.array_equal(global_ids(1, 10, seed=7), global_ids(1, 10, seed=8))
  # Seeds s and s + 1 do not share epochs (grain seeds epoch e with seed + e).
  epoch_2_of_seed_7 = global_ids(1, 13, seed=7).ravel()[50:100]
  epoch_1_of_seed_8 = global_ids(1, 7, seed=8).ravel()[:50]
  assert not np.array_equal(epoch_2_of_seed_7, epoch_1_of_seed_8)


def test_processes_load_only_their_own_rows():
  process_count, num_batches = 4, 10
  streams, sources = [], []
  for p in range(process_count):
    def make(source, p=p):
      return pipeline.train_iterator(source, global_batch_size=GLOBAL_BATCH, seed=3,
                                     process_index=p, process_count=process_count)

    # The stream well past what is consumed below: prefetching reads ahead.
    streams.append([tuple(b["id"].tolist()) for b in take(make(ToySource()), num_batches + 30)])
    source = ToySource()
    take(make(source), num_batches)
    sources.append(source)
  for p, source in enumerate(sources):
    # One vectorized read per batch, of this process's rows only.
    assert all(len(rows) == GLOBAL_BATCH // process_count for rows in source.reads)
    assert set(source.reads) <= set(streams[p])
    assert set(streams[p][:num_batches]) <= set(source.reads)
  # Within the first epoch (positions < 50), processes read disjoint rows.
  first_epoch = [set(itertools.chain(*s[:6])) for s in streams]  # 6 global batches: 48 positions
  for a, b in itertools.combinations(range(process_count), 2):
    assert not first_epoch[a] & first_epoch[b]


def test_source_without_get_batch():
  vectorized = global_ids(2, 8)
  np.testing.assert_array_equal(
      global_ids(2, 8, source_factory=lambda: ToySource(vectorized=False)), vectorized)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_resume_from_state(process_index, process_count):
  def make():
    return pipeline.train_iterator(ToySource(), global_batch_size=GLOBAL_BATCH, seed=11,
                                   process_index=process_index, process_count=process_count)

  uninterrupted = take(make(), 17)
  it = make()
  take(it, 7)  # past the first epoch boundary (50 / 8 = 6.25 batches)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint would store
  resumed = make()
  resumed.set_state(state)
  for expected, batch in zip(uninterrupted[7:], take(resumed, 10)):
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])


def test_state_carries_over_process_counts_and_rejects_other_streams():
  one = pipeline.train_iterator(ToySource(), global_batch_size=GLOBAL_BATCH, seed=11)
  take(one, 9)
  state = one.get_state()
  assert state == {"next_batch": 9, "seed": 11, "global_batch_size": GLOBAL_BATCH,
                   "num_records": NUM_RECORDS}
  expected = np.concatenate([b["id"] for b in take(one, 3)])
  resumed = []
  for p in range(2):
    it = pipeline.train_iterator(ToySource(), global_batch_size=GLOBAL_BATCH, seed=11,
                                 process_index=p, process_count=2)
    it.set_state(state)
    resumed.append(take(it, 3))
  np.testing.assert_array_equal(
      np.concatenate([np.concatenate([resumed[0][k]["id"], resumed[1][k]["id"]]) for k in range(3)]),
      expected)
  for key, value in (("seed", 12), ("global_batch_size", 16), ("num_records", 49)):
    with pytest.raises(ValueError, match=key):
      pipeline.train_iterator(ToySource(), global_batch_size=GLOBAL_BATCH, seed=11).set_state(
          {**state, key: value})


def test_train_iterator_rejects_bad_arguments():
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_iterator(ToySource(), global_batch_size=10, seed=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.train_iterator(ToySource(), global_batch_size=8, seed=0, process_index=2,
                            process_count=2)
  with pytest.raises(ValueError, match="empty"):
    pipeline.train_iterator(ToySource(0), global_batch_size=8, seed=0)


@pytest.mark.parametrize("num_records,batch_size,process_count",
                         [(50, 8, 1), (50, 4, 2), (50, 4, 4), (48, 2, 4), (3, 2, 4), (50, 3, 3)])
def test_eval_covers_everything_once(num_records, batch_size, process_count):
  expected_count = pipeline.num_eval_batches(num_records, batch_size=batch_size,
                                             process_count=process_count)
  assert expected_count == math.ceil(num_records / (batch_size * process_count))
  per_process = []
  for p in range(process_count):
    batches = list(pipeline.eval_batches(ToySource(num_records), batch_size=batch_size,
                                         process_index=p, process_count=process_count))
    assert len(batches) == expected_count  # the same on every process
    for batch in batches:
      assert batch["mask"].dtype == bool
      assert batch["image"].shape == (batch_size, 4, 4, 3)  # batch_size is per process
      np.testing.assert_array_equal(batch["mask"], batch["id"] >= 0)
      assert (batch["latlng"][~batch["mask"], 0] == num_records - 1).all()  # padding: last record
    per_process.append(batches)
  # In order: global batch k is the processes' batches k in process order.
  order = np.concatenate([np.concatenate([per_process[p][k]["id"][per_process[p][k]["mask"]]
                                          for p in range(process_count)])
                          for k in range(expected_count)])
  np.testing.assert_array_equal(order, np.arange(num_records))
  # "index": the rows' numbers, consecutive over each global batch (padding past the end).
  index = np.concatenate([np.concatenate([per_process[p][k]["index"] for p in range(process_count)])
                          for k in range(expected_count)])
  np.testing.assert_array_equal(index, np.arange(expected_count * batch_size * process_count))
  assert index.dtype == np.int32
  # Iterable more than once.
  again = list(pipeline.eval_batches(ToySource(num_records), batch_size=batch_size,
                                     process_index=0, process_count=process_count))
  np.testing.assert_array_equal(np.concatenate([b["id"] for b in again]),
                                np.concatenate([b["id"] for b in per_process[0]]))


def test_eval_fully_masked_batches():
  # 50 records, 4 per process on 4 processes: the 4th global batch holds 48, 49
  # on process 0 and nothing on processes 1-3.
  last = [list(pipeline.eval_batches(ToySource(), batch_size=4, process_index=p,
                                     process_count=4))[-1]
          for p in range(4)]
  np.testing.assert_array_equal(last[0]["mask"], [True, True, False, False])
  for p in (1, 2, 3):
    assert not last[p]["mask"].any()


def test_eval_rejects_bad_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.eval_batches(ToySource(), batch_size=0)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.eval_batches(ToySource(), batch_size=4, process_index=4, process_count=4)


@pytest.fixture(scope="module")
def earth_test_source():
  return earth.EarthSource("test", s2.TokenSpec(level=20, group_size=2))


def test_earth_source_through_train_iterator(earth_test_source):
  source = earth_test_source
  one = take(pipeline.train_iterator(source, global_batch_size=64, seed=5), 3)
  halves = [take(pipeline.train_iterator(source, global_batch_size=64, seed=5, process_index=p,
                                         process_count=2), 3) for p in range(2)]
  for k, batch in enumerate(one):
    assert batch["image"].shape == (64, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (64, 11) and batch["tokens"].dtype == np.int32
    assert batch["latlng"].dtype == np.float32 and batch["id"].dtype == np.int64
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][k][key], halves[1][k][key]]), batch[key])
    rows = np.searchsorted(source.ids, batch["id"])
    np.testing.assert_array_equal(source.ids[rows], batch["id"])
    np.testing.assert_array_equal(batch["tokens"], source.tokens[rows])
    lat, lon = earth.load_coordinates()
    np.testing.assert_array_equal(batch["image"],
                                  earth.crop_images(lat[batch["id"]], lon[batch["id"]]))


def test_earth_eval_pass(earth_test_source):
  per_process = [list(pipeline.eval_batches(earth_test_source, batch_size=512, process_index=p,
                                            process_count=2)) for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 5  # ceil(4797 / 1024)
  ids = np.concatenate([b["id"][b["mask"]] for pair in zip(*per_process) for b in pair])
  np.testing.assert_array_equal(ids, earth_test_source.ids)
  last = per_process[1][-1]
  assert last["mask"].sum() == 4797 - 4 * 1024 - 512 and last["image"].shape == (512, 64, 64, 3)


def test_worker_processes_give_the_same_batches(earth_test_source):
  expected = take(pipeline.train_iterator(earth_test_source, global_batch_size=32, seed=2), 6)
  it = pipeline.train_iterator(earth_test_source, global_batch_size=32, seed=2, worker_count=1)
  try:
    got = take(it, 3)
    state = it.get_state()
  finally:
    it.close()
  # A checkpoint from a run with workers resumes on none.
  resumed = pipeline.train_iterator(earth_test_source, global_batch_size=32, seed=2)
  resumed.set_state(state)
  got += take(resumed, 3)
  for a, b in zip(expected, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
