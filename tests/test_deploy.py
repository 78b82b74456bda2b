"""The deployment bundle and the HTTP server, on the tiny circuit: export, serve in another
process, classify an image file; bad requests get 4xx and the server keeps serving; no
secret key in the server's folder or in any request body."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import requests
import torch

import data
import deploy
from conftest import ROOT, assert_no_secret_key
from deployment import bundle_client, read_image
from fhe import CompileOptions, compile_checkpoint
from serving import RemoteServer, ServerError, wait_until_up

TINY_FHE = ["--p-error", "1e-9", "--rounding-bits", "4", "--rounding-method", "exact", "--n-calib", "40"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    deploy.main(["export", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), *TINY_FHE, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def server(bundle):
    """`deploy.py serve` in a subprocess on a free port; yields (url, process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy.py"), "serve", "--dir", str(bundle / "server"),
                             "--port", str(port), "--max-ciphertext-mib", "1"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout_s=180, process=proc)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bundle_holds_what_each_side_needs_and_no_key(bundle, tiny_checkpoint):
    assert sorted(p.name for p in (bundle / "server").iterdir()) == ["server.zip"]
    assert sorted(p.name for p in (bundle / "client").iterdir()) == ["README.md", "clear_layer.pt", "client.zip", "preprocess.json"]
    for z in ("client/client.zip", "server/server.zip"):
        assert not any("key" in n.lower() for n in zipfile.ZipFile(bundle / z).namelist())
    spec = json.loads((bundle / "client" / "preprocess.json").read_text())
    assert spec["classes"] == list(data.CLASSES) and spec["deployment"]["p_error"] == 1e-9
    # the TorchScript clear layer runs without the project's models (or Brevitas) and equals it
    from checkpoints import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    x = torch.randn(8, 3, 32, 32)
    code = ("import sys, torch; sys.modules['brevitas'] = None; sys.modules['models'] = None\n"
            f"m = torch.jit.load({str(bundle / 'client' / 'clear_layer.pt')!r})\n"
            "x = torch.load(sys.argv[1]); torch.save(m(x), sys.argv[1])")
    path = bundle / "x.pt"
    torch.save(x, path)
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    with torch.no_grad():
        assert torch.equal(torch.load(path), model.clear(x))


def test_read_image_equals_the_dataset_preprocessing(tiny_data_dir, tmp_path):
    from PIL import Image

    spec = {"image_size": 32, "mean": list(data.MEAN), "std": list(data.STD)}
    test = data.dataset("test", tiny_data_dir, n=1)
    png = tmp_path / "image.png"  # test image 0, as a file
    Image.fromarray(test.arrays.images[test.indices[0]]).save(png)
    assert np.array_equal(read_image(png, spec), test[0][0].numpy())
    big = tmp_path / "big.jpg"  # any size is resized to 32 x 32
    Image.open(png).resize((97, 61)).save(big)
    assert read_image(big, spec).shape == (3, 32, 32)
    (tmp_path / "not.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image"):
        read_image(tmp_path / "not.png", spec)


def test_classify_through_a_server_in_another_process_equals_simulation(bundle, server, tiny_checkpoint, tiny_data_dir, tmp_path):
    url, _ = server
    pngs = [sorted((tiny_data_dir / "test" / c).glob("*.png"))[0] for c in data.CLASSES[:3]]
    rows = deploy.main(["classify", "--dir", str(bundle / "client"), "--server", url, *map(str, pngs), "--json", str(tmp_path / "r.json")])
    assert [r["image"] for r in rows] == list(map(str, pngs))
    client, spec = bundle_client(bundle / "client")
    o = CompileOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), p_error=1e-9, rounding_bits=4, rounding_method="exact", n_calib=40)
    model, _, qm, _ = compile_checkpoint(o)
    feats = client.features(np.stack([read_image(p, spec) for p in pngs]))
    sim = qm.forward(feats, fhe="simulate")  # deterministic at this p_error, and equal to FHE
    assert np.allclose([r["logits"] for r in rows], sim, rtol=0, atol=1e-6)
    assert [r["class"] for r in rows] == [data.CLASSES[i] for i in sim.argmax(1)]
    assert all(r["seconds"]["server"] > 0 and r["sent_bytes"] > 0 for r in rows)
    # keys were made once and kept; a second run reuses them and the server's key id
    ids = json.loads((bundle / "client" / "keys" / "servers.json").read_text())
    deploy.main(["classify", "--dir", str(bundle / "client"), "--server", url, str(pngs[0])])
    assert json.loads((bundle / "client" / "keys" / "servers.json").read_text()) == ids
    assert requests.get(url + "/health").json()["clients"] == 1


def test_bad_requests_get_4xx_and_the_server_keeps_serving(bundle, server, tiny_data_dir):
    url, proc = server
    client, spec = bundle_client(bundle / "client")
    client.keygen(force=False)
    remote = RemoteServer(url)
    image = read_image(sorted((tiny_data_dir / "test" / data.CLASSES[1]).glob("*.png"))[0], spec)
    payload, _ = client.encrypt(image)
    with pytest.raises(ServerError, match="unknown key id") as e:  # a client that uploaded no keys
        remote.predict("0" * 32, payload)
    assert e.value.status == 404
    for body, status in ((b"garbage" * 10, 400), (b"", 400)):
        r = requests.post(url + "/keys", data=body)
        assert r.status_code == status and r.json()["detail"]
    keys_file = bundle / "eval.bin"
    keys_file.write_bytes(client.evaluation_keys())
    key_id = remote.upload_keys(keys_file)
    for body, status in ((b"garbage" * 10, 400), (payload[: len(payload) // 2], 400), (b"x" * (2 * 2**20), 413)):
        with pytest.raises(ServerError) as e:
            remote.predict(key_id, body)
        assert e.value.status == status
    # a ciphertext of another circuit (another shape) is refused
    from concrete import fhe

    other = fhe.Compiler(lambda x: x + 1, {"x": "encrypted"}).compile([np.zeros(4, dtype=np.int64) + i for i in range(4)])
    other.keygen()
    with pytest.raises(ServerError, match="shape") as e:
        remote.predict(key_id, other.encrypt(np.arange(4)).serialize())
    assert e.value.status == 400
    result, seconds = remote.predict(key_id, payload)  # still serving, and right
    assert proc.poll() is None and seconds > 0
    logits = client.decrypt(result)
    # a second client with keys of its own gets its own id, and its results decrypt with its keys
    other_dir = bundle / "client_b"
    shutil.copytree(bundle / "client", other_dir, ignore=shutil.ignore_patterns("keys"))
    client_b, _ = bundle_client(other_dir)
    client_b.keygen()
    (other_dir / "eval.bin").write_bytes(client_b.evaluation_keys())
    id_b = remote.upload_keys(other_dir / "eval.bin")
    assert id_b != key_id
    payload_b, _ = client_b.encrypt(image)
    for _ in range(2):  # alternate between the two clients
        assert np.array_equal(client_b.decrypt(remote.predict(id_b, payload_b)[0]), logits)
        assert np.array_equal(client.decrypt(remote.predict(key_id, payload)[0]), logits)
    # nothing the server holds or received contains a piece of the secret key
    held = [p.read_bytes() for p in (bundle / "server").rglob("*") if p.is_file()]
    assert len(held) >= 3  # server.zip and the uploaded key sets
    assert_no_secret_key(held + [payload, keys_file.read_bytes()], client.dir)
    with pytest.raises(AssertionError):  # and the search does find a secret key where there is one
        assert_no_secret_key([p.read_bytes() for p in (client.dir / "keys").rglob("secretKey_*")], client.dir)


def test_a_failed_export_leaves_the_earlier_bundle_as_it_was(bundle, tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch):
    import deployment

    out = tmp_path / "bundle"
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("keys", "client_b", "*.bin", "x.pt"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(deployment, "write_client_extras", fail)
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), *TINY_FHE, "--out", str(out)]
    with pytest.raises(RuntimeError, match="tracing failed"):
        deploy.main(args)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no staging left either
    monkeypatch.undo()
    deploy.main(args)  # a complete export replaces it
    assert sorted(p.name for p in out.iterdir()) == ["client", "server"]
    assert (out / "client" / "clear_layer.pt").is_file()
