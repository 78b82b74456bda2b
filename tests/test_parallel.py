"""Real FHE on Dask workers (a local cluster), on the tiny circuit: the same results as one
in-process server, no image lost when a worker dies, no secret key sent to a worker."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import data
import fhe_inference
from conftest import assert_no_secret_key
from deployment import deploy_local
from fhe import CompileOptions, compile_checkpoint
from parallel import fhe_servers

TINY_FHE = ["--p-error", "1e-9", "--rounding-bits", "4", "--rounding-method", "exact", "--n-calib", "40"]


@pytest.fixture(scope="module")
def tiny_deployed(tiny_checkpoint, tiny_data_dir, tmp_path_factory):
    o = CompileOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), p_error=1e-9, rounding_bits=4, rounding_method="exact", n_calib=40)
    model, _, qm, _ = compile_checkpoint(o)
    client, server_dir, _ = deploy_local(qm, model, tmp_path_factory.mktemp("deployed"))
    images, _ = data.stack(data.dataset("test", tiny_data_dir, n=4))
    payloads = [client.encrypt(img)[0] for img in images]
    return client, server_dir, payloads


def rows_by_index(out: Path) -> dict:
    return {int(r["index"]): r for r in csv.DictReader(open(out / "predictions.csv"))}


def test_two_workers_equal_one_in_process_server(tiny_checkpoint, tiny_data_dir, tmp_path):
    """At a negligible p_error and exact rounding, FHE is deterministic: the rows of a
    2-worker local cluster (any order) equal the in-process ones bit for bit."""
    args = ["--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), "--n-images", "4", *TINY_FHE]
    fhe_inference.main(args + ["--out-dir", str(tmp_path / "one")])
    summary = fhe_inference.main(args + ["--out-dir", str(tmp_path / "two"), "--workers", "2"])
    one, two = rows_by_index(tmp_path / "one"), rows_by_index(tmp_path / "two")
    assert sorted(two) == sorted(one) == [0, 1, 2, 3]
    for i in one:
        assert two[i]["fhe_logits"] == one[i]["fhe_logits"] == one[i]["sim_logits"]
    assert summary["n_images"] == 4 and summary["fhe_sim_agreement"] == 1.0 and summary["sim_sim_agreement"] == 1.0
    lo, hi = summary["fhe_top1_ci95"]
    assert lo <= summary["fhe_top1"] <= hi


def test_a_killed_worker_loses_no_image(tiny_deployed):
    client, server_dir, payloads = tiny_deployed
    with fhe_servers(server_dir, client.evaluation_keys(), workers=2, threads_per_worker=1) as submit:
        futures = [submit(p) for p in payloads]
        deadline = time.time() + 120
        while not any(f.done() for f in futures) and time.time() < deadline:
            time.sleep(0.05)
        pids = submit.dask_client.run(os.getpid)  # {worker address: pid}
        assert len(pids) == 2
        os.kill(next(iter(pids.values())), signal.SIGKILL)  # mid-run: the others are queued or running
        results = [f.result(timeout=300) for f in futures]
    expected = [client.decrypt(fhe_servers_inline(server_dir, client, p)) for p in payloads]
    assert all(np.array_equal(client.decrypt(r), e) for (r, _), e in zip(results, expected))


def fhe_servers_inline(server_dir, client, payload) -> bytes:
    with fhe_servers(server_dir, client.evaluation_keys()) as submit:
        return submit(payload).result()[0]


def test_nothing_sent_to_workers_holds_a_secret_key(tiny_deployed):
    """Everything handed to the workers (the plugin's bytes, each task's ciphertext) is
    searched for a piece of every secret key the client holds."""
    client, server_dir, payloads = tiny_deployed
    sent: list = []
    with fhe_servers(server_dir, client.evaluation_keys(), workers=1, sent=sent) as submit:
        [submit(p).result(timeout=300) for p in payloads[:2]]
    blobs = [b for item in sent for b in (item.values() if isinstance(item, dict) else [item])]
    assert len(blobs) == 4 and all(isinstance(b, bytes) for b in blobs)
    assert_no_secret_key(blobs, client.dir)


def test_simulations_on_two_workers_equal_the_in_process_ones(tiny_checkpoint, tiny_data_dir, tmp_path):
    """Each worker compiles the same circuit as the driver (at a negligible p_error and exact
    rounding simulation is deterministic), and the draws come back whole and in order."""
    import infer_vl
    import p_error_search
    from fhe import calibration_set, clear_features, compile_options
    from parallel import ParallelOptions, simulators

    o = ParallelOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), p_error=1e-9, rounding_bits=4,
                        rounding_method="exact", n_calib=40, workers=2)
    model, _, qm, _ = compile_checkpoint(o)
    images, labels = data.stack(data.dataset("test", tiny_data_dir))
    feats = clear_features(model, images)
    with simulators(o, batch=6) as workers:  # 20 images: chunks of 6, 6, 6, 2
        workers.compile(o.checkpoint, compile_options(o), calibration_set(model, o))
        draws = workers.draws(feats, 2)
    here = qm.forward(feats, fhe="simulate")
    assert len(draws) == 2 and all(np.array_equal(d, here) for d in draws)
    # the scripts: infer_vl's draws and p_error_search's on workers, through their command lines
    args = ["--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), *TINY_FHE, "--repeats", "2"]
    assert infer_vl.main(args + ["--workers", "2"])["simulate_spread"] == infer_vl.main(args)["simulate_spread"]
    r = p_error_search.main(["--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), "--rounding-bits", "4",
                             "--rounding-method", "exact", "--n-calib", "40", "--n-images", "20", "--max-iter", "1", "--n-sim", "1",
                             "--n-validation", "3", "--workers", "2", "--json", str(tmp_path / "s.json"),
                             # a range of negligible p_errors, so that no draw loses an image: a search over
                             # the default range passed one draw by luck and then failed its validation
                             "--lower", "1e-9", "--upper", "1e-6"])
    assert r["validation"]["runs"] == 3 and r["p_error"] == 1e-6 and r["validation"]["mean_drop"] == 0
