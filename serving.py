"""The FHE server over HTTP (FastAPI), and the client's end of it.

    app = make_app(server_dir, keys_dir)      # served by uvicorn (deploy.py serve)
    remote = RemoteServer("http://host:8000") # the client's calls (deploy.py classify)

Bodies are raw bytes (application/octet-stream):

    GET  /health              -> {"status": "ok", "input_shape": [...], "clients": number of key sets held}
    POST /keys                body: serialized evaluation keys, streamed to disk -> {"key_id": "..."}
    POST /predict/{key_id}    body: one serialized ciphertext -> the serialized encrypted result
                              (header X-Server-Seconds: the FHE run time)

Errors are 4xx with a JSON "detail": 404 unknown key id, 413 body over the limit, 400 keys
or a ciphertext that do not deserialize or do not fit the circuit. Each key set is stored
under a random id of its own, so two clients' keys cannot be mixed up. The server only ever
holds evaluation keys: it can compute on ciphertexts, never decrypt them.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response  # at module level: FastAPI reads the annotations
from fastapi.concurrency import run_in_threadpool

from deployment import FHEServer

MAX_KEY_BYTES = 2 * 2**30  # evaluation keys: tens to hundreds of MiB for the shipped models
MAX_CIPHERTEXT_BYTES = 64 * 2**20  # one encrypted image: about 0.2 MiB for the fast model
KEYS_IN_MEMORY = 4  # deserialized key sets kept loaded (the rest are read from disk on use)
KEY_ID = re.compile(r"^[0-9a-f]{32}$")


def input_shape(server: FHEServer) -> list[int]:
    """The circuit's encrypted input shape, from the client specs inside server.zip."""
    info = json.loads(server.fhe.server.client_specs.program_info.serialize())
    return info["circuits"][0]["inputs"][0]["typeInfo"]["lweCiphertext"]["abstractShape"]["dimensions"]


def make_app(server_dir, keys_dir, max_key_bytes: int = MAX_KEY_BYTES,
             max_ciphertext_bytes: int = MAX_CIPHERTEXT_BYTES):
    from concrete import fhe

    server = FHEServer(server_dir)
    shape = input_shape(server)
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    loaded: OrderedDict = OrderedDict()  # key_id -> EvaluationKeys, least recently used first
    run_lock = threading.Lock()  # one FHE run at a time: it already uses every core it is given
    app = FastAPI(title="CIFAR-10 FHE server", description=__doc__)

    async def read_body(request: Request, limit: int, sink) -> int:
        """Stream the body into sink(chunk), refusing more than `limit` bytes."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body of {int(declared)} bytes is over the limit of {limit}")
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body is over the limit of {limit} bytes")
            sink(chunk)
        if size == 0:
            raise HTTPException(400, "empty body")
        return size

    def keys_for(key_id: str):
        if not KEY_ID.match(key_id) or not (keys_dir / f"{key_id}.bin").is_file():
            raise HTTPException(404, f"unknown key id {key_id!r}: upload evaluation keys to /keys first")
        if key_id not in loaded:
            loaded[key_id] = fhe.EvaluationKeys.deserialize((keys_dir / f"{key_id}.bin").read_bytes())
            while len(loaded) > KEYS_IN_MEMORY:
                loaded.popitem(last=False)
        loaded.move_to_end(key_id)
        return loaded[key_id]

    @app.get("/health")
    def health():
        return {"status": "ok", "input_shape": shape,
                "clients": len(list(keys_dir.glob("*.bin")))}

    @app.post("/keys")
    async def upload_keys(request: Request):
        key_id = uuid.uuid4().hex
        part = keys_dir / f"{key_id}.part"
        try:
            with open(part, "wb") as f:
                await read_body(request, max_key_bytes, f.write)
            try:
                keys = fhe.EvaluationKeys.deserialize(part.read_bytes())
            except Exception as e:
                raise HTTPException(400, f"the body is not serialized evaluation keys ({type(e).__name__})") from None
            part.rename(keys_dir / f"{key_id}.bin")
        finally:
            part.unlink(missing_ok=True)
        loaded[key_id] = keys
        return {"key_id": key_id}

    @app.post("/predict/{key_id}")
    async def predict(key_id: str, request: Request):
        keys = keys_for(key_id)
        chunks: list[bytes] = []
        await read_body(request, max_ciphertext_bytes, chunks.append)
        payload = b"".join(chunks)

        def run():
            with run_lock:
                return server.run(payload, keys)

        try:  # Concrete checks what it reads: bytes that are no ciphertext, or another circuit's
            result, seconds = await run_in_threadpool(run)
        except RuntimeError as e:
            raise HTTPException(400, f"ciphertext rejected (this circuit takes {shape}): {e}") from None
        return Response(result, media_type="application/octet-stream", headers={"X-Server-Seconds": f"{seconds:.4f}"})

    return app


class ServerError(RuntimeError):
    """The server answered with an error (status and its detail)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server answered {status}: {detail}")
        self.status = status


class RemoteServer:
    """The client's end: upload evaluation keys once, then send ciphertexts."""

    def __init__(self, url: str, timeout_s: float = 3600):
        import requests

        self.url, self.timeout = url.rstrip("/"), timeout_s
        self.http = requests.Session()

    def _post(self, path: str, body):
        r = self.http.post(self.url + path, data=body, timeout=self.timeout,
                           headers={"Content-Type": "application/octet-stream"})
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ServerError(r.status_code, str(detail))
        return r

    def health(self) -> dict:
        r = self.http.get(self.url + "/health", timeout=30)
        r.raise_for_status()
        return r.json()

    def upload_keys(self, key_file) -> str:
        """Stream a key file to the server; returns the key id it assigned."""
        with open(key_file, "rb") as f:
            return self._post("/keys", f).json()["key_id"]

    def predict(self, key_id: str, payload: bytes) -> tuple[bytes, float]:
        """(encrypted result bytes, server seconds)."""
        r = self._post(f"/predict/{key_id}", payload)
        return r.content, float(r.headers.get("X-Server-Seconds", np.nan))


def wait_until_up(url: str, timeout_s: float = 120, process=None) -> dict:
    """Poll /health until the server answers (it loads server.zip first); stop early if
    `process` (a subprocess.Popen running it) has exited."""
    import requests

    t0 = time.perf_counter()
    while True:
        try:
            return RemoteServer(url).health()
        except requests.ConnectionError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server process exited with status {process.returncode}") from None
            if time.perf_counter() - t0 > timeout_s:
                raise
            time.sleep(0.5)
