"""attribute_dataset and open_attributions: results equal per-batch attribute()
calls; a 2-rank gloo run equals the 1-process run; a run killed with SIGKILL and
started again equals an uninterrupted one; LayerIG with dict items; bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import igfast
import dataset_worker
from dataset_worker import SETTINGS, SmallNet

HERE = os.path.dirname(os.path.abspath(__file__))


def same_igfast_environment():
    """The environment for a worker process that imports the igfast this process
    imported: under `python -m pytest` the source tree comes first on sys.path, while
    a script started by path would import an installed (non-editable) igfast, whose
    kernels change the last bits of the results."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(igfast.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def files_of(directory):
    """Every shard array (and note: the digest of its inputs), by relative path (the
    manifest and config aside)."""
    arrays = {}
    for shard in sorted(d for d in os.listdir(directory) if d.startswith("shard-")):
        for name in sorted(os.listdir(os.path.join(directory, shard))):
            path = os.path.join(directory, shard, name)
            if name.endswith(".npy"):
                arrays[f"{shard}/{name}"] = np.load(path)
            else:
                with open(path, encoding="utf-8") as handle:
                    arrays[f"{shard}/{name}"] = handle.read()
    return arrays


def assert_same_files(a, b):
    first, second = files_of(a), files_of(b)
    assert first.keys() == second.keys() and first
    for key in first:
        assert np.array_equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one-process"))
    summary = dataset_worker.run(out)
    return out, summary


def test_results_equal_attribute_calls(reference_run):
    out, summary = reference_run
    assert summary["examples"] == summary["computed"] == dataset_worker.EXAMPLES
    store = igfast.open_attributions(out)
    images, _ = dataset_worker.dataset().tensors
    model = SmallNet().eval()
    for begin in range(0, dataset_worker.EXAMPLES, SETTINGS["batch_size"]):
        batch = images[begin:begin + SETTINGS["batch_size"]]
        with torch.no_grad():
            outputs = model(batch)
        expected, delta = igfast.IntegratedGradients(model).attribute(
            batch, target=outputs.argmax(1), n_steps=SETTINGS["n_steps"], return_convergence_delta=True)
        rows = slice(begin, begin + len(batch))
        torch.testing.assert_close(store.attributions[rows], expected, rtol=0, atol=0)
        torch.testing.assert_close(store.deltas[rows], delta, rtol=0, atol=0)
        torch.testing.assert_close(store.outputs[rows], outputs, rtol=0, atol=0)
        assert torch.equal(store.targets[rows], outputs.argmax(1))
    # Reading: an example, slices across shard boundaries, steps, memory maps.
    assert len(store) == 40 and store.attributions[5:13].shape == (8, 1, 6, 6)
    # Each field tells its whole shape and dtype without reading its shards.
    for field in ("attributions", "deltas", "outputs", "targets"):
        whole = getattr(store, field)[:]
        assert getattr(store, field).shape == tuple(whole.shape), field
        assert getattr(store, field).dtype == whole.dtype, field
    assert "shape=(40, 1, 6, 6)" in repr(store.attributions)
    assert torch.equal(store[11]["attributions"], store.attributions[11])
    assert torch.equal(store.deltas[3:30:4], store.deltas[:][3:30:4])
    assert isinstance(store.attributions.numpy(slice(8, 12)), np.memmap)
    assert summary["delta_max"] == pytest.approx(float(store.deltas[:].abs().max()))


def test_run_on_the_test_device_equals_the_cpu_run(reference_run, tmp_path, device):
    """The model on --device: batches follow it there, the files come back the same."""
    out = str(tmp_path / "on-device")
    summary = igfast.attribute_dataset(SmallNet().eval().to(device), dataset_worker.dataset(), out, **SETTINGS)
    assert summary["computed"] == dataset_worker.EXAMPLES
    ours, on_cpu = igfast.open_attributions(out), igfast.open_attributions(reference_run[0])
    assert torch.equal(ours.targets[:], on_cpu.targets[:])
    tolerance = 0.0 if device.type == "cpu" else 1e-5
    for field in ("attributions", "deltas", "outputs"):
        torch.testing.assert_close(getattr(ours, field)[:], getattr(on_cpu, field)[:], rtol=tolerance, atol=tolerance)


def test_bfloat16_model_outputs_are_stored_as_float32(tmp_path):
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).to(torch.bfloat16).eval()
    images = torch.randn(8, 6).to(torch.bfloat16)
    igfast.attribute_dataset(model, TensorDataset(images), str(tmp_path), batch_size=4, shard_size=4, n_steps=4,
                             progress=False)
    store = igfast.open_attributions(str(tmp_path))
    with torch.no_grad():
        outputs = model(images)
    assert store.outputs[:].dtype == torch.float32 and torch.equal(store.outputs[:], outputs.float())
    expected = igfast.IntegratedGradients(model).attribute(images[4:], target=outputs[4:].argmax(1), n_steps=4)
    torch.testing.assert_close(store.attributions[4:], expected, rtol=0, atol=0)


def test_torchrun_group_is_gloo_whatever_the_device(monkeypatch):
    """The group only carries barriers: gloo serves models on every device, where nccl
    would need one GPU per rank (two ranks on one GPU fail) and a device per barrier."""
    import torch.distributed as dist
    from igfast.dataset import _Distributed

    class Started(Exception):
        pass

    backends = []

    def init_process_group(backend=None, **kwargs):
        backends.append(backend)
        raise Started

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Started):
        _Distributed()
    assert backends == ["gloo"]


def test_two_gloo_ranks_equal_one_process(reference_run, tmp_path):
    out = str(tmp_path / "two-ranks")
    mp.spawn(dataset_worker.run_rank, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2)
    assert_same_files(out, reference_run[0])
    manifest = igfast.open_attributions(out).manifest
    assert manifest["shards"][-1] == [32, 40] and manifest["num_shards"] == 5


def test_changed_data_stops_every_rank_before_it_writes(reference_run, tmp_path):
    """Only the rank owning a changed finished shard refused; the other went on writing
    shards of the changed data into the store before torchrun stopped it."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(os.path.join(reference_run[0], "config.json"), out)
    shutil.copytree(os.path.join(reference_run[0], "shard-000000"), out / "shard-000000")  # rank 0's
    mp.spawn(dataset_worker.refuse_changed_data, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2)
    for rank in (0, 1):
        assert (out / f"rank-{rank}.txt").read_text().startswith("refused: `data` differs"), rank
    assert sorted(d for d in os.listdir(out) if d.startswith("shard-")) == ["shard-000000"]


def test_killed_run_resumes_to_the_same_files(reference_run, tmp_path):
    out = str(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "dataset_worker.py"), out, "0.08"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=same_igfast_environment())
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [d for d in os.listdir(out) if d.startswith("shard-")] if os.path.isdir(out) else []
        if len(done) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json")), "the run finished before the kill"
    visible = [d for d in os.listdir(out) if d.startswith("shard-")]
    assert 2 <= len(visible) < 5
    for shard in visible:  # only whole shards are visible
        assert sorted(os.listdir(os.path.join(out, shard))) == [
            "attributions.npy", "deltas.npy", "inputs.sha256", "outputs.npy", "targets.npy"]
    with pytest.raises(ValueError, match="not finished"):
        igfast.open_attributions(out)
    summary = dataset_worker.run(out)  # the same arguments: resumes
    assert summary["computed"] == 40 - 8 * len(visible)
    assert not any(".tmp" in d for d in os.listdir(out))
    assert_same_files(out, reference_run[0])


def test_layer_integrated_gradients_with_dict_items(tmp_path):
    from test_layer_integrated_gradients import TokenClassifier, token_batch

    torch.manual_seed(3)
    model = TokenClassifier().eval()
    ids, mask = token_batch(4, batch=6)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"inputs": ids[i], "additional_forward_args": (mask[i],),
                    "baselines": torch.zeros_like(ids[i]), "label": i % 3}

    lig = igfast.LayerIntegratedGradients(model, model.words)
    igfast.attribute_dataset(lig, Tokens(), str(tmp_path), target="label", batch_size=4,
                             shard_size=4, n_steps=6, progress=False)
    store = igfast.open_attributions(str(tmp_path))
    expected = lig.attribute(ids[4:], baselines=0, target=[1, 2], additional_forward_args=(mask[4:],),
                             n_steps=6)
    torch.testing.assert_close(store.attributions[4:], expected, rtol=1e-6, atol=1e-7)
    assert store.targets[:].tolist() == [0, 1, 2, 0, 1, 2]


def test_bad_arguments(reference_run, tmp_path):
    model, data = SmallNet().eval(), dataset_worker.dataset()
    before = files_of(reference_run[0])
    with pytest.raises(ValueError, match="holds a run with other arguments .*n_steps: 8 there, 9 now"):
        igfast.attribute_dataset(model, data, reference_run[0], **{**SETTINGS, "n_steps": 9})
    after = files_of(reference_run[0])  # nothing overwritten
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="does not read the data set in order"):
        igfast.attribute_dataset(model, DataLoader(data, shuffle=True), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="map-style torch Dataset"):
        igfast.attribute_dataset(model, iter([1, 2]), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="needs data-set items with labels"):
        igfast.attribute_dataset(model, TensorDataset(data.tensors[0]), str(tmp_path / "c"),
                                 target="label", progress=False)
    with pytest.raises(ValueError, match="`shard_size` must be an integer >= 1"):
        igfast.attribute_dataset(model, data, str(tmp_path / "d"), shard_size=0)
    with pytest.raises(ValueError, match="`target` must be"):
        igfast.attribute_dataset(model, data, str(tmp_path / "e"), target="best")
    with pytest.raises(ValueError, match="no attribute_dataset run"):
        igfast.open_attributions(str(tmp_path))
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1; got 0"):
        igfast.attribute_dataset(model, data, str(tmp_path / "f"), batch_size=0)
    with pytest.raises(ValueError, match="`data` holds no examples"):  # was a FileNotFoundError
        igfast.attribute_dataset(model, TensorDataset(data.tensors[0][:0]), str(tmp_path / "g"), progress=False)


def test_a_loaders_collate_fn_forms_the_batches(tmp_path):
    """The DataLoader's collate_fn (here: raw pixels to [0, 1]) shapes what the model
    sees, as when Captum runs over the loader's batches; default_collate was every
    value off (up to 326x)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    raw = TensorDataset(torch.randint(0, 256, (10, 6)).float(), torch.arange(10) % 3)

    def to_unit(items):
        inputs, labels = torch.utils.data.default_collate(items)
        return inputs / 255, labels

    loader = DataLoader(raw, batch_size=4, collate_fn=to_unit)
    igfast.attribute_dataset(model, loader, str(tmp_path), target="label", n_steps=8, progress=False)
    store = igfast.open_attributions(str(tmp_path))
    ig = igfast.IntegratedGradients(model)
    expected = torch.cat([ig.attribute(x, target=y, n_steps=8) for x, y in loader])
    torch.testing.assert_close(store.attributions[:], expected, rtol=1e-6, atol=1e-7)


class ReadingProcesses(torch.utils.data.Dataset):
    """Items of a TensorDataset that leave a file named by the process that read them."""

    def __init__(self, data, directory):
        self.data, self.directory = data, directory

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        open(os.path.join(self.directory, str(os.getpid())), "a").close()
        return self.data[index]

    def open(self):  # what a worker_init_fn opens per worker (an h5py file, say)
        self.opened_in = os.getpid()


def open_in_each_worker(worker_id):
    torch.utils.data.get_worker_info().dataset.open()


def test_a_loaders_workers_load_the_batches(tmp_path):
    """A DataLoader with num_workers was read in the calling process alone (its
    dataset and collate_fn taken, its workers not): the batches are now loaded in
    worker processes, whose worker_init_fn finds the caller's dataset (a Subset of it
    broke that pattern), and the attributions are those of a loader without workers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    raw = TensorDataset(torch.randn(20, 6), torch.arange(20) % 3)
    readers = tmp_path / "readers"
    readers.mkdir()
    stores = {}
    for workers in (0, 2):
        loader = DataLoader(ReadingProcesses(raw, str(readers)), batch_size=4, num_workers=workers,
                            worker_init_fn=open_in_each_worker if workers else None)
        stores[workers] = str(tmp_path / f"workers{workers}")
        igfast.attribute_dataset(model, loader, stores[workers], target="label", n_steps=8, shard_size=8,
                                 progress=False)
        if workers:
            assert set(os.listdir(readers)) - {str(os.getpid())}, "no worker read an item"
    torch.testing.assert_close(igfast.open_attributions(stores[2]).attributions[:],
                               igfast.open_attributions(stores[0]).attributions[:], rtol=0, atol=0)


def test_tuple_inputs_with_tuple_baselines(tmp_path):
    """Per-example baselines as a tuple in dict items (default_collate makes it a list),
    and call-wide baselines mixing a tensor and a number (its hash crashed)."""
    torch.manual_seed(1)

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 3), torch.nn.Linear(3, 3)

        def forward(self, a, b):
            return torch.tanh(self.a(a)) * self.b(b)

    model = TwoInputs().eval()
    a, b = torch.randn(6, 2), torch.randn(6, 3)
    base_a, base_b = torch.randn(6, 2), torch.randn(6, 3)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"inputs": (a[i], b[i]), "baselines": (base_a[i], base_b[i])}

    ig = igfast.IntegratedGradients(model)
    igfast.attribute_dataset(ig, Items(), str(tmp_path / "per_example"), target=1, batch_size=4, n_steps=8,
                             progress=False)
    store = igfast.open_attributions(str(tmp_path / "per_example"))
    expected = ig.attribute((a, b), baselines=(base_a, base_b), target=1, n_steps=8)
    torch.testing.assert_close(store.attributions[0][:], expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(store.attributions[1][:], expected[1], rtol=1e-6, atol=1e-7)
    pairs = TensorDataset(a, b)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"inputs": pairs[i]}

    mixed = (torch.zeros(1, 2), 0.5)
    igfast.attribute_dataset(ig, Pairs(), str(tmp_path / "mixed"), target=1, batch_size=4, n_steps=8,
                             baselines=mixed, progress=False)
    store = igfast.open_attributions(str(tmp_path / "mixed"))
    expected = ig.attribute((a, b), baselines=mixed, target=1, n_steps=8)
    torch.testing.assert_close(store.attributions[1][:], expected[1], rtol=1e-6, atol=1e-7)


def test_torchrun_environment_is_enough(reference_run, tmp_path):
    """Under torchrun, attribute_dataset starts the gloo group from the environment, and
    keeps it for a second call (made and torn down per call, the second call's group
    failed to connect in 3 of 9 runs)."""
    out = str(tmp_path / "torchrun")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(HERE, "dataset_worker.py"), out, "--twice"],
        capture_output=True, text=True, timeout=300, env=same_igfast_environment())
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_files(out, reference_run[0])
    assert_same_files(out + "-second", reference_run[0])


def _small_run(directory, model, data, **kwargs):
    options = dict(target="label", batch_size=2, shard_size=4, n_steps=6, progress=False)
    return igfast.attribute_dataset(model, data, str(directory), **{**options, **kwargs})


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).eval()


class _Stopping(torch.nn.Module):
    """The model, failing from call ``stop_after + 1`` on (a plain attribute: not part
    of the weights), as a killed run."""

    def __init__(self, model, stop_after):
        super().__init__()
        self.model, self.stop_after, self.calls = model, stop_after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.stop_after:
            raise RuntimeError("stop")
        return self.model(x)


def test_resuming_with_other_data_a_collate_or_a_model_mode_is_refused(tmp_path):
    """Each of these was accepted and mixed two setups in one store (0.27-0.93 off)."""
    model = _mlp()
    x, y = torch.randn(10, 6), torch.arange(10) % 3
    data = TensorDataset(x, y)

    wrapped = _Stopping(model, stop_after=10)  # 4 calls a batch: stops in the second shard
    with pytest.raises(RuntimeError, match="stop"):
        _small_run(tmp_path / "data", wrapped, data)
    wrapped.stop_after = 10 ** 6
    with pytest.raises(ValueError, match="differs from the data the run .* attributed"):
        _small_run(tmp_path / "data", wrapped, TensorDataset(x + 1, y))  # same model
    _small_run(tmp_path / "data", wrapped, data)  # the same data resumes
    assert len(igfast.open_attributions(str(tmp_path / "data"))) == 10

    doubled = DataLoader(data, batch_size=2, collate_fn=lambda items: tuple(
        t * 2 if t.is_floating_point() else t for t in torch.utils.data.default_collate(items)))
    with pytest.raises(ValueError, match="differs from the data"):
        _small_run(tmp_path / "data", wrapped, doubled)

    _small_run(tmp_path / "mode", model, data)
    with pytest.raises(ValueError, match="other arguments .*model"):
        _small_run(tmp_path / "mode", model.train(), data)
    model.eval()
    other = _mlp()
    with torch.no_grad():
        other[0].weight.mul_(2)
    with pytest.raises(ValueError, match="other arguments .*model"):
        _small_run(tmp_path / "mode", lambda inputs: other(inputs), data)


def test_the_models_running_statistics_stay_as_they_were(tmp_path):
    """attribute_dataset's own forward (outputs, predicted targets) updated them, so the
    same call on the same model was then refused as another model."""
    model = _mlp().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(8, 6), torch.arange(8) % 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm in training mode
        _small_run(tmp_path, model, data, target="predicted")
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        _small_run(tmp_path, model, data, target="predicted")  # the finished run, accepted


def test_a_collate_fn_that_pads_per_batch_is_a_clear_error(tmp_path):
    """Batches of 7 and 8 tokens: numpy failed while joining the shard, or (one batch
    per shard) the store could not be read."""
    torch.manual_seed(0)
    sequences = [torch.randn(length, 5) for length in (7, 6, 8, 7)]
    model = lambda x: x.sum(1)  # noqa: E731  (batch, length, 5) -> (batch, 5)

    def pad(items):
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)

    for shard_size in (4, 2):
        with pytest.raises(ValueError, match="shape .* per example.*pads each batch"):
            igfast.attribute_dataset(model, DataLoader(sequences, batch_size=2, collate_fn=pad),
                                     str(tmp_path / str(shard_size)), target=1, shard_size=shard_size,
                                     n_steps=4, progress=False)


def test_foreign_entries_in_the_output_directory(tmp_path):
    data = TensorDataset(torch.randn(6, 6), torch.arange(6) % 3)
    model = _mlp()
    (tmp_path / "a" / "shard-backup").mkdir(parents=True)  # not a shard's name: left alone
    _small_run(tmp_path / "a", model, data)
    assert len(igfast.open_attributions(str(tmp_path / "a")).attributions[:]) == 6
    (tmp_path / "b" / "shard-000001").mkdir(parents=True)  # a shard's name, not igfast's
    (tmp_path / "b" / "shard-000001" / "README").write_text("mine")
    with pytest.raises(ValueError, match="igfast did not write it"):
        _small_run(tmp_path / "b", model, data)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text('{"author": "someone"}')
    with pytest.raises(ValueError, match="manifest.json that is not this run's"):
        _small_run(tmp_path / "c", model, data)
    with pytest.raises(ValueError, match="not igfast's: it has no num_examples"):
        igfast.open_attributions(str(tmp_path / "c"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("not json")
    with pytest.raises(ValueError, match="config.json' is not igfast's: it is not JSON"):
        _small_run(tmp_path / "d", model, data)


def test_slices_with_any_step_and_auto_steps(tmp_path):
    """Negative steps gave empty slices; n_steps='auto' was refused."""
    model = _mlp()
    data = TensorDataset(torch.randn(9, 6), torch.arange(9) % 3)
    _small_run(tmp_path, model, data, n_steps="auto", tolerance=1e-4)
    store = igfast.open_attributions(str(tmp_path))
    every = store.attributions[:]
    for key in (slice(None, None, -1), slice(7, 1, -2), slice(-1, -6, -1), slice(None, None, 3)):
        assert np.array_equal(store.attributions[key].numpy(), every.numpy()[key]), key
    expected, info = igfast.IntegratedGradients(model).attribute(
        data.tensors[0], target=data.tensors[1], n_steps="auto", tolerance=1e-4, return_adaptive_info=True)
    assert bool(info.converged.all())
    torch.testing.assert_close(every, expected, rtol=1e-5, atol=1e-7)


def test_iterable_datasets_are_refused_up_front(tmp_path):
    class Counted(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.randn(4, 6))

        def __len__(self):
            return 4

    for data in (Counted(), DataLoader(Counted(), batch_size=2)):
        with pytest.raises(ValueError, match="iterable-style Dataset"):
            igfast.attribute_dataset(_mlp(), data, str(tmp_path), target=0, progress=False)
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="batch_size=None"):
        igfast.attribute_dataset(_mlp(), DataLoader(TensorDataset(torch.randn(4, 6)), batch_size=None),
                                 str(tmp_path), target=0, progress=False)


class _Held:
    """A model held in a plain object that a function calls: igfast cannot read its
    weights, so only its results tell a changed one."""

    def __init__(self, model):
        self.nets = [model]

    def __call__(self, x):
        return self.nets[0](x)


def test_resuming_with_a_model_or_layer_igfast_cannot_read_is_refused(tmp_path):
    """A model inside a plain object, and LayerIG over a function with another layer of
    the same kind, were accepted on resume: the store mixed two models' rows. The first
    batch of a written shard is now attributed again and compared."""
    data = TensorDataset(torch.randn(10, 6), torch.arange(10) % 3)
    held = _Held(_mlp())
    _small_run(tmp_path / "held", held, data)
    os.remove(tmp_path / "held" / "manifest.json")
    shutil.rmtree(tmp_path / "held" / "shard-000002")  # as a run killed before its last shard
    held.nets[0] = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match="differ from the run's .*attributions.* relative from those written"):
        _small_run(tmp_path / "held", held, data)
    held.nets[0] = _mlp()  # the same model again resumes
    _small_run(tmp_path / "held", held, data)
    assert len(igfast.open_attributions(str(tmp_path / "held"))) == 10

    model = _mlp()
    for layer, resumes in ((model[0], False), (model[3], True)):
        if resumes:
            os.remove(tmp_path / "layer" / "manifest.json")
            shutil.rmtree(tmp_path / "layer" / "shard-000002")
        explainer = igfast.LayerIntegratedGradients(lambda x: model(x), layer)
        if resumes:  # model[3] where model[0] was: both Linear, told apart by their results
            with pytest.raises(ValueError, match="differ from the run's"):
                _small_run(tmp_path / "layer", explainer, data)
        else:
            _small_run(tmp_path / "layer", explainer, data)


def test_a_run_refused_before_it_wrote_leaves_the_directory_usable(tmp_path):
    """config.json was written before the first attribute() call: after a refused target
    the corrected call in the same directory was refused as 'a run with other arguments'."""
    data = TensorDataset(torch.randn(10, 6), torch.arange(10) % 3)
    with pytest.raises(igfast.TargetError):
        _small_run(tmp_path / "run", _mlp(), data, target=7)
    assert os.listdir(tmp_path / "run") == []
    _small_run(tmp_path / "run", _mlp(), data, target=2)
    assert len(igfast.open_attributions(str(tmp_path / "run"))) == 10


def test_labels_targets_and_number_forms(tmp_path):
    """Float labels were cut to class indices (1.7 -> 1), numpy numbers failed writing
    the config, a tuple output and a module's extra state crashed with AttributeErrors."""
    x = torch.randn(6, 6)
    model = _mlp()
    with pytest.raises(igfast.TargetError, match="integer class labels.*float32"):
        _small_run(tmp_path / "a", model, TensorDataset(x, torch.full((6,), 1.7)))
    _small_run(tmp_path / "b", model, TensorDataset(x, torch.full((6,), 2.0)))  # whole numbers are classes
    assert igfast.open_attributions(str(tmp_path / "b")).targets[:].tolist() == [2] * 6
    with pytest.raises(igfast.TargetError, match="integer class labels"):
        _small_run(tmp_path / "c", model, [(x[i], "cat") for i in range(6)])
    _small_run(tmp_path / "d", model, x, target=np.int64(1), n_steps=torch.tensor([6]))
    _small_run(tmp_path / "e", model, x, target=1, n_steps="auto", max_steps=np.int64(33))
    with pytest.raises(igfast.OutputTypeError, match="target='predicted' needs the model to return"):
        _small_run(tmp_path / "f", lambda inputs: (model(inputs), inputs), x, target="predicted")

    class WithExtraState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.version = _mlp(), "v1"

        def forward(self, inputs):
            return self.model(inputs)

        def get_extra_state(self):
            return {"version": self.version}

        def set_extra_state(self, state):
            self.version = state["version"]

    extra = WithExtraState()
    _small_run(tmp_path / "g", extra, x, target=0)
    os.remove(tmp_path / "g" / "manifest.json")
    shutil.rmtree(tmp_path / "g" / "shard-000001")
    extra.version = "v2"  # (extra state is not hashed, its repr may change between processes: results are compared)
    _small_run(tmp_path / "g", extra, x, target=0)
    assert len(igfast.open_attributions(str(tmp_path / "g"))) == 6
    with pytest.raises(ValueError, match="Baselines are given twice"):
        _small_run(tmp_path / "h", model, [{"inputs": x[i], "baselines": x[i] * 0} for i in range(6)], target=0,
                   baselines=0.0)
    with pytest.raises(ValueError, match="a batch_sampler of its own"):
        _small_run(tmp_path / "i", model, DataLoader(x, batch_sampler=[[0, 1], [2, 3]]), target=0)


class _OpensInWorkers(ReadingProcesses):
    """Items readable only where a worker_init_fn opened the data set (a file per worker)."""

    def __init__(self, data, directory):
        super().__init__(data, directory)
        self.opened = False

    def open(self):
        self.opened = True

    def __getitem__(self, index):
        if not self.opened:
            raise RuntimeError("no file open in this process")
        return super().__getitem__(index)


def test_resuming_reads_written_shards_through_the_workers(tmp_path):
    """The resume's check of written shards read them with dataset[i] in the calling
    process: a data set that opens its file in worker_init_fn failed there."""
    (tmp_path / "readers").mkdir()
    data = _OpensInWorkers(TensorDataset(torch.randn(10, 6), torch.arange(10) % 3), str(tmp_path / "readers"))
    loader = DataLoader(data, batch_size=2, num_workers=2, worker_init_fn=open_in_each_worker)
    _small_run(tmp_path / "run", _mlp(), loader)
    os.remove(tmp_path / "run" / "manifest.json")
    shutil.rmtree(tmp_path / "run" / "shard-000002")
    _small_run(tmp_path / "run", _mlp(), loader)
    assert len(igfast.open_attributions(str(tmp_path / "run"))) == 10


def test_two_processes_writing_one_shard(tmp_path):
    """Two launches not in one group on one directory both wrote shard 0 under the tag
    r0: one removed the other's temporary folder, or failed renaming onto the written
    shard. Tags name the process, and a shard already written stands."""
    from igfast.shards import complete_shards, write_shard
    fields = {"deltas": np.zeros(2), "attributions": np.ones((2, 3))}
    write_shard(str(tmp_path), 0, fields, tag="r0-1")
    write_shard(str(tmp_path), 0, {**fields, "attributions": np.full((2, 3), 2.0)}, tag="r0-2")
    assert complete_shards(str(tmp_path)) == [0] and sorted(os.listdir(tmp_path)) == ["shard-000000"]
    assert (np.load(tmp_path / "shard-000000" / "attributions.npy") == 1).all()


def test_a_resume_whose_first_batch_has_nan_attributions(tmp_path):
    """An example with a NaN input has NaN attributions: the resume's comparison of the
    first batch read NaN as moved and blamed the model (a review's report)."""
    x = torch.randn(10, 6)
    x[0, 2] = float("nan")
    data = TensorDataset(x, torch.arange(10) % 3)
    _small_run(tmp_path / "run", _mlp(), data)
    os.remove(tmp_path / "run" / "manifest.json")
    shutil.rmtree(tmp_path / "run" / "shard-000002")
    _small_run(tmp_path / "run", _mlp(), data)
    assert len(igfast.open_attributions(str(tmp_path / "run"))) == 10
