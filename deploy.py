"""Deployment: export a bundle, serve its server half over HTTP, classify images from the client half.

    python deploy.py export   --checkpoint checkpoints/fast.pt --out deploy/
    python deploy.py serve    --dir deploy/server --port 8000
    python deploy.py classify --dir deploy/client --server http://127.0.0.1:8000 cat.png dog.jpg

export    compiles the checkpoint at its deployed FHE settings and writes deploy/client
          (client.zip, the clear first layer as TorchScript, preprocess.json, README.md) and
          deploy/server (server.zip). No key is generated or written.
serve     runs the FHE server (serving.py) with uvicorn: it receives each client's
          evaluation keys once, then ciphertexts, and returns encrypted results.
classify  is the image's owner: it generates the keys once (kept in <dir>/keys, secret key
          included, never sent), uploads the evaluation keys once per server (the id is kept
          in <dir>/keys/servers.json), then per image: read and resize, clear layer, encrypt,
          send, decrypt; prints the class and the seconds of every stage.

`python deploy.py COMMAND --help` lists each command's options.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli import UserError, check_output_dir, check_output_file, opt, parse_config, run_main
from fhe import CompileOptions

DESCRIPTIONS = {
    "export": "Compile a checkpoint at its deployed FHE settings and write the client and server bundle.",
    "serve": "Serve a bundle's server folder over HTTP (evaluation keys once, then ciphertexts).",
    "classify": "Classify image files under FHE through a running server; keys are generated once and kept.",
}
COMMANDS = tuple(DESCRIPTIONS)


@dataclass
class ExportConfig(CompileOptions):
    out: str = opt("deploy", "folder for the bundle: <out>/client and <out>/server (replaced)")

    def __post_init__(self):
        super().__post_init__()
        check_output_dir(self.out, "--out")


@dataclass
class ServeConfig:
    dir: str = opt("deploy/server", "the bundle's server folder (holding server.zip)")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "TCP port")
    keys_dir: str | None = opt(None, "where uploaded evaluation keys are stored (default: <dir>/keys)")
    max_key_mib: int = opt(2048, "largest evaluation-key upload accepted, MiB")
    max_ciphertext_mib: int = opt(64, "largest ciphertext accepted, MiB")

    def __post_init__(self):
        if not (Path(self.dir) / "server.zip").is_file():
            raise UserError(f"--dir {self.dir}: no server.zip there (write a bundle with deploy.py export)")
        if not 0 < self.port < 65536 or self.max_key_mib < 1 or self.max_ciphertext_mib < 1:
            raise UserError("--port must be 1-65535, --max-key-mib and --max-ciphertext-mib >= 1")
        check_output_dir(self.keys_dir or Path(self.dir) / "keys", "--keys-dir")


@dataclass
class ClassifyConfig:
    images: list = field(default_factory=list, metadata={"help": "PNG or JPEG files (any size: resized to 32x32)", "positional": True})
    dir: str = opt("deploy/client", "the bundle's client folder (holding client.zip)")
    server: str = opt("http://127.0.0.1:8000", "URL of a running `deploy.py serve`")
    json: str | None = opt(None, "also write the predictions and stage times to this JSON file")

    def __post_init__(self):
        if self.json:
            check_output_file(self.json, "--json")
        if not (Path(self.dir) / "client.zip").is_file():
            raise UserError(f"--dir {self.dir}: no client.zip there (write a bundle with deploy.py export)")
        if not self.images:
            raise UserError("give at least one image file")
        missing = [p for p in self.images if not Path(p).is_file()]
        if missing:
            raise UserError(f"no such image file: {', '.join(missing)}")


def export(cfg: ExportConfig) -> dict:
    from deployment import export_bundle
    from fhe import compile_checkpoint, print_report

    model, ckpt, qm, report = compile_checkpoint(cfg)  # at the checkpoint's deployed settings unless overridden
    print_report(report)
    client_dir, server_dir = export_bundle(model, qm, ckpt, report["settings"], cfg.out)
    for d in (client_dir, server_dir):
        print(f"{d}: " + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.2f} MiB)" for p in sorted(d.iterdir())))
    return {"client": str(client_dir), "server": str(server_dir)}


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from serving import make_app

    app = make_app(cfg.dir, cfg.keys_dir or Path(cfg.dir) / "keys", cfg.max_key_mib * 2**20, cfg.max_ciphertext_mib * 2**20)
    print(f"serving {cfg.dir} on http://{cfg.host}:{cfg.port} (GET /health, POST /keys, POST /predict/<key id>)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


def key_id_for(client, remote, ids_file: Path, force: bool = False) -> str:
    """The id under which this server holds our evaluation keys: uploaded once, remembered."""
    import tempfile

    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    if remote.url in ids and not force:
        return ids[remote.url]
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:  # streamed from a file: keys can be large
        f.write(client.evaluation_keys())
        f.flush()
        size = f.tell()
        ids[remote.url] = remote.upload_keys(f.name)
    print(f"evaluation keys uploaded ({size / 2**20:.1f} MiB), key id {ids[remote.url]}")
    ids_file.write_text(json.dumps(ids, indent=1))
    return ids[remote.url]


def classify(cfg: ClassifyConfig) -> list[dict]:
    from deployment import STAGES, bundle_client, read_image
    from serving import RemoteServer, ServerError

    client, spec = bundle_client(cfg.dir)
    remote = RemoteServer(cfg.server)
    try:
        remote.health()
    except Exception as e:
        raise UserError(f"no FHE server answers at {cfg.server} ({type(e).__name__}); start one with deploy.py serve") from None
    images, read_s = [], []
    for p in cfg.images:  # every file checked before any key work
        t0 = time.perf_counter()
        try:
            images.append(read_image(p, spec))
        except ValueError as e:
            raise UserError(str(e)) from None
        read_s.append(time.perf_counter() - t0)
    keygen_s = client.keygen(force=False)  # loads the kept keys when there are some
    print(f"keys ready in {keygen_s:.1f} s (kept in {Path(cfg.dir) / 'keys'})")
    ids_file = Path(cfg.dir) / "keys" / "servers.json"
    key_id = key_id_for(client, remote, ids_file)
    rows = []
    print(f"{'image':<28} {'class':<11} " + " ".join(f"{s:>10}" for s in ("read", *STAGES)) + " sent MiB")
    for path, image, t_read in zip(cfg.images, images, read_s):
        times = {"read": t_read}
        payload, _ = client.encrypt(image, times)
        try:
            result, times["server"] = remote.predict(key_id, payload)
        except ServerError as e:
            if e.status != 404:
                raise
            key_id = key_id_for(client, remote, ids_file, force=True)  # the server forgot us (restarted elsewhere)
            result, times["server"] = remote.predict(key_id, payload)
        logits = client.decrypt(result, times)
        name = spec["classes"][int(logits.argmax())]
        rows.append({"image": str(path), "class": name, "logits": logits.tolist(), "seconds": times, "sent_bytes": len(payload),
                     "received_bytes": len(result)})
        print(f"{str(path)[-28:]:<28} {name:<11} " + " ".join(f"{times[s]:10.3f}" for s in ("read", *STAGES)) + f" {len(payload) / 2**20:8.2f}")
    if cfg.json:
        from provenance import provenance, write_json

        write_json(cfg.json, {"predictions": rows, "server": cfg.server, "model": spec["model"], "deployment": spec["deployment"],
                              "evaluation_key_bytes": len(client.evaluation_keys()), **provenance(cfg)})
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return None
        raise UserError(f"give a command: {', '.join(COMMANDS)} (python deploy.py --help)")
    cmd, rest = argv[0], argv[1:]
    cls = {"export": ExportConfig, "serve": ServeConfig, "classify": ClassifyConfig}[cmd]
    cfg = parse_config(cls, rest, DESCRIPTIONS[cmd], prog=f"deploy.py {cmd}")
    return {"export": export, "serve": serve, "classify": classify}[cmd](cfg)


if __name__ == "__main__":
    run_main(main)
