"""The deployed client / server path, through Concrete ML's deployment API.

    export(qm, out)          FHEModelDev: out/client/client.zip and out/server/server.zip
    FHEClient(client_dir)    the image's owner: keygen, clear layer, quantize, encrypt,
                             serialize; then deserialize, decrypt, dequantize. Holds the
                             secret key (client_dir/keys), which never leaves it.
    FHEServer(server_dir)    the server: server.zip plus the client's evaluation keys (bytes);
                             runs the encrypted part on ciphertext bytes, returns bytes.

Only bytes cross between the two: the evaluation keys once, then one ciphertext per image
each way. fhe_inference.py, the benchmark, the notebook and the Dask workers (parallel.py)
all go through these classes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fhe import clear_features, to_concrete, warn_if_large_keys

# Per-image stages, in order: all on the client except "server".
STAGES = ("clear", "quantize", "encrypt", "serialize", "server", "decrypt", "dequantize")


def export(qm, out_dir) -> tuple[Path, Path]:
    """Save the compiled model with FHEModelDev; the client gets client.zip, the server
    server.zip (no key in either). Returns (client_dir, server_dir)."""
    from concrete.ml.deployment import FHEModelDev

    out_dir = Path(out_dir)
    client_dir, server_dir = out_dir / "client", out_dir / "server"
    for d in (client_dir, server_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        FHEModelDev(tmp, qm).save()
        shutil.copy(Path(tmp) / "client.zip", client_dir / "client.zip")
        shutil.copy(Path(tmp) / "server.zip", server_dir / "server.zip")
    return client_dir, server_dir


# The client half of a deployment bundle (export_bundle), beside client.zip:
CLEAR_LAYER = "clear_layer.pt"  # the clear part as TorchScript: torch.jit.load runs it, no project code or Brevitas
SPEC = "preprocess.json"  # image size, normalization, class names, input shape, deployed settings
CLIENT_README = """\
# Client bundle

- client.zip: Concrete ML's client specs and quantizers (concrete.ml.deployment.FHEModelClient)
- clear_layer.pt: the model's first layer, run in the clear on this machine
  (torch.jit.load(path)(x), x float32 of shape (N, 3, 32, 32) -> the encrypted part's input)
- preprocess.json: how an image becomes x: RGB, resized to image_size x image_size with PIL's
  bilinear filter when it is another size, scaled to [0, 1], then (x - mean) / std per channel;
  the class names, in the order of the model's outputs
- keys/: created by the first key generation; holds the SECRET key: never send it anywhere

Per image: features = clear_layer(x); q = client.model.quantize_input(features) (a C-contiguous
array); ciphertext = client.client.encrypt(q).serialize(); send it with the evaluation keys'
id; decrypt the answer with client.deserialize_decrypt_dequantize(result).
"""


def export_bundle(model, qm, ckpt: dict, settings: dict, out_dir) -> tuple[Path, Path]:
    """The deployment bundle: out/client (client.zip, the clear layer as TorchScript,
    preprocess.json, a README) and out/server (server.zip only). No key anywhere. Written
    in a staging folder inside out_dir and moved into place only when complete: a failed
    export leaves an earlier bundle as it was."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        client_dir, server_dir = export(qm, staging)
        write_client_extras(model, ckpt, settings, client_dir)
        return replace_dir(client_dir, out_dir / "client"), replace_dir(server_dir, out_dir / "server")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_client_extras(model, ckpt: dict, settings: dict, client_dir: Path) -> None:
    """The clear layer (TorchScript), preprocess.json and README.md beside client.zip."""
    import torch

    import data

    cfg = ckpt["model_config"]
    size = cfg["image_size"]
    with torch.no_grad():
        traced = torch.jit.trace(model.clear.eval(), torch.zeros(1, cfg["in_channels"], size, size), check_trace=False)
    traced.save(str(client_dir / CLEAR_LAYER))
    spec = {"model": cfg["name"], "image_size": size, "mean": list(data.MEAN), "std": list(data.STD),
            "classes": list(data.CLASSES), "input_shape": [1, cfg["in_channels"], size, size],
            "deployment": settings}
    (client_dir / SPEC).write_text(json.dumps(spec, indent=1))
    (client_dir / "README.md").write_text(CLIENT_README)


def replace_dir(new: Path, dest: Path) -> Path:
    """Move the complete folder `new` to `dest`, replacing what was there (keys included:
    keys of an earlier circuit do not fit a new one)."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def read_image(path, spec: dict) -> np.ndarray:
    """A PNG / JPEG file of any size -> the model's input (3, S, S) float32, as documented in
    CLIENT_README (the same values as the dataset's preprocessing for a S x S image)."""
    from PIL import Image, UnidentifiedImageError

    s = spec["image_size"]
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: not an image PIL can read ({e})") from None
    if img.size != (s, s):
        img = img.resize((s, s), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, S, S), channels first
    mean, std = (np.asarray(spec[k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def bundle_client(client_dir) -> tuple["FHEClient", dict]:
    """The client of an exported bundle, with its clear layer loaded from TorchScript."""
    import torch

    client_dir = Path(client_dir)
    clear = torch.jit.load(str(client_dir / CLEAR_LAYER)).eval()

    def run_clear(x):
        with torch.no_grad():
            return clear(torch.as_tensor(x))

    return FHEClient(client_dir, run_clear), json.loads((client_dir / SPEC).read_text())


class _Stopwatch:
    """times[name] = seconds spent in each `with watch(name):` block."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        self._name = name
        return self

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.times[self._name] = time.perf_counter() - self._t0


class FHEClient:
    """The image's owner. `clear` maps (N, 3, 32, 32) images to the clear part's output
    (a SplitNet, whose .clear is run, or any callable returning an array)."""

    def __init__(self, client_dir, clear):
        from concrete.ml.deployment import FHEModelClient

        self.dir = Path(client_dir)
        self.fhe = FHEModelClient(str(self.dir), key_dir=str(self.dir / "keys"))
        self.clear = clear

    def keygen(self, qm=None, force: bool = True) -> float:
        """Generate the secret and evaluation keys (warns first when qm says they are large).
        Returns seconds."""
        if qm is not None:
            warn_if_large_keys(qm)
        t0 = time.perf_counter()
        self.fhe.generate_private_and_evaluation_keys(force=force)
        return time.perf_counter() - t0

    def evaluation_keys(self) -> bytes:
        """What the server needs, and nothing secret."""
        return self.fhe.get_serialized_evaluation_keys()

    def features(self, images) -> np.ndarray:
        """The clear layer on the client: C-contiguous float32 (N, C, H, W)."""
        if hasattr(self.clear, "clear"):
            return clear_features(self.clear, images)
        return to_concrete(self.clear(images))

    def encrypt(self, image, times: dict | None = None) -> tuple[bytes, np.ndarray]:
        """One image (3, 32, 32) -> (ciphertext bytes, its clear-layer features (1, C, H, W))."""
        watch = _Stopwatch()
        with watch("clear"):
            feats = self.features(image[None])
        with watch("quantize"):
            q = np.ascontiguousarray(self.fhe.model.quantize_input(feats))
        with watch("encrypt"):
            enc = self.fhe.client.encrypt(q)
        with watch("serialize"):
            payload = enc.serialize()
        if times is not None:
            times.update(watch.times)
        return payload, feats

    def decrypt(self, result: bytes, times: dict | None = None) -> np.ndarray:
        """Encrypted result bytes -> logits (num_classes,)."""
        watch = _Stopwatch()
        with watch("decrypt"):
            q_out = self.fhe.deserialize_decrypt(result)
        with watch("dequantize"):
            logits = self.fhe.model.post_processing(self.fhe.model.dequantize_output(q_out))
        if times is not None:
            times.update(watch.times)
        return np.asarray(logits).reshape(-1)


class FHEServer:
    """The server: the compiled model (server.zip) and evaluation keys, both received as
    files or bytes. It never sees an image, a class or a secret key."""

    def __init__(self, server_dir):
        from concrete.ml.deployment import FHEModelServer

        self.dir = Path(server_dir)
        self.fhe = FHEModelServer(str(self.dir))
        self.fhe.load()

    @staticmethod
    def load_keys(key_bytes: bytes):
        from concrete import fhe

        return fhe.EvaluationKeys.deserialize(key_bytes)

    def run(self, payload: bytes, keys) -> tuple[bytes, float]:
        """Ciphertext bytes in, encrypted result bytes out, and the seconds it took."""
        t0 = time.perf_counter()
        result = self.fhe.run(payload, keys)
        return result, time.perf_counter() - t0


def deploy_local(qm, model, out_dir) -> tuple[FHEClient, Path, float]:
    """Export, generate keys on the client, hand the server folder the evaluation keys as a
    file (the "upload"). Returns (client, server folder, keygen seconds)."""
    client_dir, server_dir = export(qm, out_dir)
    client = FHEClient(client_dir, model)
    keygen_s = client.keygen(qm)
    (server_dir / "evaluation_keys.bin").write_bytes(client.evaluation_keys())
    return client, server_dir, keygen_s


def classify(client: FHEClient, server: FHEServer, keys, image) -> tuple[np.ndarray, dict, int]:
    """One image through client -> server -> client in this process: (logits, stage seconds,
    ciphertext bytes sent)."""
    t: dict = {}
    payload, _ = client.encrypt(image, t)
    result, t["server"] = server.run(payload, keys)
    return client.decrypt(result, t), t, len(payload)
