"""Training on two hosts equals training on one: two processes joined by ``jax.distributed`` on localhost.

Three Python processes run at once, each on the CPU with virtual devices (XLA reads its device count once
per process, hence subprocesses; XLA's cheapest code generation, which only makes them compile faster):

- processes 0 and 1 of a multi-process run (``sdjax.devices.initialize`` with a free localhost port as the
  coordinator; the CPU collectives across processes are gloo, jax 0.10.2's default, nothing to configure),
  two devices each: 4 global devices;
- one plain process with 4 devices, which trains on all 4 and then on 1.

Each run is :func:`sdjax.train.fit` on a small one-level UNet with sdjax's diffusion loss: 16 images,
batch 8, 3 SGD steps (the update is −η·g, the gradient itself; step 3 starts the second epoch, reshuffled).
The 2-process run stops after step 2 and a second ``fit`` (fresh models) resumes from its checkpoint to
step 3. The data's "image" array is wrapped in a recorder of the rows read from it.

Checked:
- every process reads only its own rows of each global batch: process p exactly rows [4p, 4p + 4) of
  ``batch_indices(data_key, 16, 8, step)``; the one-process run reads all 8;
- the parameter update θ_3 − θ_0 and the three losses of the 2-process run equal the 1-process 4-device
  and 1-device runs to 2e-5 relative (max |Δ| / max |ref|; measured: update 2.9e-6 against both, one
  float32 ulp of its largest entry; losses 9.7e-8 against 4 devices, 5.8e-7 against 1): only float32
  summation order differs (per-device batch, the all-reduce across processes);
- both processes end with bit-identical states (one replicated state), with 3 losses in the history;
- process 0 alone writes the checkpoint (steps 1, 2 and, after the resume, 3); process 1 never does;
  the file holds exactly process 0's final state and the three losses.

A process that fails or hangs (timeout below) fails the test with the stderr of all three.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from sdjax import io
from sdjax.data.loader import batch_indices, iterate_batches
from sdjax.devices import global_mesh, host_rows, initialize, shard_host_batch
from sdjax.train import data_key

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # all three; the whole file took 35 s (44 s with an empty compilation cache) on a loaded 2-core CPU
N, BATCH, STEPS = 16, 8, 3

WORKER = textwrap.dedent(
    """
    import json, os, sys, time, traceback
    from pathlib import Path
    start = time.perf_counter()

    def die(*error):  # fail now: at a normal exit jax.distributed's shutdown would wait for the peer process
        traceback.print_exception(*error)
        sys.stderr.flush()
        os._exit(1)
    sys.excepthook = die

    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    import sdjax.devices
    if num_processes > 1:
        sdjax.devices.initialize(f"localhost:{port}", num_processes, process_id, timeout_s=120)

    import jax, numpy as np, optax
    from flax import nnx
    import sdjax.train
    from sdjax.io import flatten
    from sdjax.diffusion import diffusion_loss
    from sdjax.models.unet import UNet2D, UNetConfig
    from sdjax.schedulers import NoiseSchedule
    from sdjax.speed import random_init

    class Recorder:
        "An array that logs which rows are read from it."
        def __init__(self, a):
            self.a, self.reads = a, []
        def __len__(self):
            return len(self.a)
        def __getitem__(self, rows):
            self.reads.append(np.asarray(rows).tolist())
            return self.a[rows]

    writes = []
    save_tree = sdjax.train.save_tree
    def spy(path, tree, meta):
        writes.append(int(tree.step))
        save_tree(path, tree, meta)
    sdjax.train.save_tree = spy

    config = UNetConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16,),
                        layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                        norm_num_groups=8)  # one level: it compiles in half the time of two
    images = np.random.default_rng(1).uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32)
    runs = {"devices": jax.device_count(), "local devices": jax.local_device_count(),
            "processes": jax.process_count()}
    # (name, devices, runs of fit: the steps each ends at); the 2-process run stops after 2 steps and resumes
    plans = {"one process": [("4", None, [3]), ("1", jax.devices()[:1], [3])]}.get(out.name, [("2x2", None, [2, 3])])
    runs["seconds"] = {"start": round(time.perf_counter() - start, 1)}
    for name, devices, stops in plans:
        t0 = time.perf_counter()
        data = {"image": Recorder(images)}
        checkpoint = out.parent / "checkpoint.safetensors" if name == "2x2" else None
        for steps in stops:  # a fresh model each time: what it trained comes back from the checkpoint
            model = random_init(UNet2D, config, np.random.default_rng(0))
            before = [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]
            result = sdjax.train.fit(model, diffusion_loss(NoiseSchedule()), data, steps=steps, batch_size=8,
                                     optimizer=optax.sgd(0.1), devices=devices, progress=False,
                                     checkpoint=checkpoint, checkpoint_every=1)
        after = [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.Param))]
        np.savez(out.parent / f"{out.name} {name} state.npz", **flatten(jax.device_get(result.state)))
        update = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
        np.save(out.parent / f"{out.name} {name} update.npy", update)
        runs[name] = {"loss": result.history["loss"], "rows": data["image"].reads}
        runs["seconds"][name] = round(time.perf_counter() - t0, 1)
    runs["writes"] = writes
    out.write_text(json.dumps(runs))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_all(tmp_path: Path, worker: str = WORKER) -> dict[str, dict]:
    """Start the two processes of the distributed run and the one-process reference together and wait for
    all three. The first to fail, or the deadline, ends the others (a lone process would wait for its peer
    until jax's own timeout): the error shows every process's exit status and the end of its stderr."""
    port = free_port()
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    jobs = {"process 0": (0, 2, 2), "process 1": (1, 2, 2), "one process": (0, 1, 4)}  # id, processes, devices
    procs = {}
    for name, (process_id, num_processes, devices) in jobs.items():
        flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
        argv = [sys.executable, "-c", worker, str(process_id), str(num_processes), str(port), str(tmp_path / name)]
        with open(tmp_path / f"{name}.stderr", "w") as stderr:  # files, not pipes: nothing blocks on a full pipe
            procs[name] = subprocess.Popen(
                argv, cwd=ROOT, env=env | {"XLA_FLAGS": flags}, stdout=subprocess.DEVNULL, stderr=stderr
            )
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs.values()):
            break
        time.sleep(0.2)
    status = {name: "stopped while running" if p.poll() is None else p.poll() for name, p in procs.items()}
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    if any(code != 0 for code in status.values()):
        why = f"not done within {TIMEOUT_S} s" if time.monotonic() >= deadline else "a process failed"
        lines = [f"{why}; exit status {status}"]
        for name in procs:
            lines += [f"----- stderr of {name} -----", (tmp_path / f"{name}.stderr").read_text()[-3000:]]
        raise AssertionError("\n".join(lines))
    return {name: json.loads((tmp_path / name).read_text()) for name in procs}


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_two_processes_train_as_one(tmp_path):
    out = run_all(tmp_path)
    p0, p1, one = out["process 0"], out["process 1"], out["one process"]
    print({k: {key: v for key, v in run.items() if key not in ("2x2", "4", "1")} for k, run in out.items()})
    assert [p0["devices"], p0["local devices"], p0["processes"]] == [4, 2, 2]
    assert [p1["devices"], p1["local devices"], p1["processes"]] == [4, 2, 2]
    assert [one["devices"], one["processes"]] == [4, 1]

    # each process read only its own rows of every global batch; the one-process run read all of them
    key = data_key(jax.random.PRNGKey(0))
    batches = [batch_indices(key, N, BATCH, step).tolist() for step in range(STEPS)]
    assert p0["2x2"]["rows"] == [b[:4] for b in batches]
    assert p1["2x2"]["rows"] == [b[4:] for b in batches]
    assert one["4"]["rows"] == batches == one["1"]["rows"]

    # the same training: updates and losses within float32 reassociation (tolerance 2e-5, see the docstring)
    load = lambda name: np.load(tmp_path / f"{name}.npy")  # noqa: E731
    update = load("process 0 2x2 update")
    measured = {
        "update vs 4": rel(update, load("one process 4 update")),
        "update vs 1": rel(update, load("one process 1 update")),
        "loss vs 4": rel(p0["2x2"]["loss"], one["4"]["loss"]),
        "loss vs 1": rel(p0["2x2"]["loss"], one["1"]["loss"]),
    }
    print(measured, "update norm", float(np.linalg.norm(update)))
    assert np.linalg.norm(update) > 0.1  # it trained
    assert all(v < 2e-5 for v in measured.values()), measured
    assert len(p0["2x2"]["loss"]) == STEPS and p0["2x2"]["loss"] == p1["2x2"]["loss"]
    state_0, state_1 = (dict(np.load(tmp_path / f"process {i} 2x2 state.npz")) for i in (0, 1))
    assert state_0.keys() == state_1.keys() and any(k.startswith("params.") for k in state_0)
    for k in state_0:  # one replicated state: both processes hold the same bits
        np.testing.assert_array_equal(state_0[k], state_1[k], err_msg=k)

    # process 0 wrote the checkpoint at every step, across the resume; process 1 never
    assert p0["writes"] == [1, 2, 3] and p1["writes"] == []
    flat, meta = io.read(tmp_path / "checkpoint.safetensors")
    assert flat.keys() == state_0.keys() and int(flat["step"]) == STEPS
    for k in flat:
        np.testing.assert_array_equal(flat[k], state_0[k], err_msg=k)
    assert meta["history"]["loss"] == p0["2x2"]["loss"]


@pytest.mark.devices(4)
def test_one_process_is_single_host_data_parallelism(monkeypatch):
    """With one process the global mesh is the local one, this host holds every row, and bad input is named."""
    mesh = global_mesh()
    assert list(mesh.devices.flat) == jax.local_devices() and mesh.shape["data"] == 4  # the marker's four
    assert host_rows(8, mesh) == slice(0, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        host_rows(6, mesh)
    batch = {"x": np.arange(24, dtype=np.float32).reshape(8, 3)}
    x = shard_host_batch(batch, mesh, 8)["x"]
    assert x.sharding.spec == PartitionSpec("data") and [s.data.shape for s in x.addressable_shards] == [(2, 3)] * 4
    np.testing.assert_array_equal(np.asarray(x), batch["x"])
    with pytest.raises(ValueError, match="rows 0:8"):
        shard_host_batch({"x": np.zeros((4, 3), np.float32)}, mesh, 8)

    key = jax.random.PRNGKey(3)  # rows=: a slice of the very batch, for any step (here in epoch 1)
    full = next(iterate_batches(np.arange(20), 8, key, start_step=3))
    part = next(iterate_batches(np.arange(20), 8, key, start_step=3, rows=slice(2, 6)))
    np.testing.assert_array_equal(part, full[2:6])

    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        initialize("localhost:1")
