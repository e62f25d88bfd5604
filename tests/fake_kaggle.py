"""A fake Kaggle API on loopback that speaks only the calls the real `kaggle` client makes for this kit.

The real client (kaggle 2.x with KAGGLE_API_ENVIRONMENT=LOCALHOST) POSTs JSON to `/api/v1/<service>/<Method>`:
competitions (submissions, data download: a redirect to a file URL), datasets and blobs (a dataset's files go up
through StartBlobUpload → PUT to its createUrl → CreateDataset / CreateDatasetVersion with the tokens), kernels
(SaveKernel, GetKernelSessionStatus, ListKernelSessionOutput whose file URLs the client then GETs). Everything is
recorded so tests can assert what reached the "server".
"""

from __future__ import annotations

import json
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_PREFIX = "/api/v1/"


class FakeKaggle:
    def __init__(self, data_zip: bytes = b"", fail_status: int | None = None):
        self.data_zip = data_zip
        self.fail_status = fail_status          # answer every API call with this HTTP status (e.g. 403)
        self.calls: list[tuple[str, dict]] = []  # (method name, JSON body)
        self.uploads: dict[str, bytes] = {}     # token → uploaded bytes
        self.submissions: list[dict] = []
        self.auth_headers: list[str] = []
        self.datasets: dict[str, list[dict]] = {}       # "owner/slug" → versions: {"notes", "files": {name: bytes}}
        self.blobs: dict[str, tuple[str, bytes]] = {}   # token → (file name, uploaded bytes)
        self.kernels: dict[str, list[dict]] = {}        # "owner/slug" → every SaveKernel body
        self.kernel_statuses: list[tuple[str, str]] = [("COMPLETE", "")]   # answered in turn; the last repeats
        self.kernel_outputs: dict[str, bytes] = {}      # output file name → bytes
        self.kernel_log = ""
        self.dataset_statuses: list[str] = ["READY"]    # a created dataset's status, answered in turn; the last repeats
        self.fail_methods: dict[str, int] = {}          # method → HTTP status to answer it with
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):      # keep test output quiet
                pass

            def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, data: dict):
                self._send(status, json.dumps(data).encode())

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self):
                if not self.path.startswith(API_PREFIX):
                    return self._json(404, {"code": 404, "message": "not found"})
                method = self.path[len(API_PREFIX):].rsplit("/", 1)[-1]
                body = json.loads(self._body() or b"{}")
                fake.calls.append((method, body))
                fake.auth_headers.append(self.headers.get("Authorization", ""))
                if method in fake.fail_methods:
                    status = fake.fail_methods[method]
                    return self._json(status, {"code": status, "message": "You must accept this competition's rules"})
                if fake.fail_status:
                    return self._json(fake.fail_status, {"code": fake.fail_status,
                                                         "message": "You must accept this competition's rules"})
                if method == "StartSubmissionUpload":
                    token = f"blob-{len(fake.uploads) + 1}"
                    fake.uploads[token] = b""
                    return self._json(200, {"token": token, "createUrl": f"{fake.url}/upload/{token}"})
                if method == "CreateSubmission":
                    fake.submissions.append(body)
                    return self._json(200, {"message": "Successfully submitted to Histopathologic Cancer Detection",
                                            "ref": len(fake.submissions)})
                if method == "ListSubmissions":
                    listed = [{"ref": i + 1, "date": "2026-11-25T10:00:00Z", "fileName": f"s{i + 1}.csv",
                               "description": s.get("submissionDescription", ""), "status": "COMPLETE",
                               "publicScore": "0.9712", "privateScore": "0.9655"}
                              for i, s in enumerate(fake.submissions)][::-1]
                    return self._json(200, {"submissions": listed})
                answer = fake.answer_datasets_and_kernels(method, body)
                if answer is not None:
                    return self._json(*answer)
                if method == "DownloadDataFiles":
                    self.send_response(302)
                    self.send_header("Location", f"{fake.url}/files/histopathologic-cancer-detection.zip")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._json(404, {"code": 404, "message": f"the fake does not speak {method}"})

            def do_PUT(self):
                token = self.path.rsplit("/", 1)[-1]
                if token in fake.blobs:
                    name, _ = fake.blobs[token]
                    fake.blobs[token] = (name, self._body())
                    return self._json(200, {})
                if token not in fake.uploads:
                    return self._json(404, {"code": 404, "message": "unknown upload"})
                fake.uploads[token] += self._body()
                return self._json(200, {})

            def do_GET(self):
                if self.path.startswith("/kernel-output/"):
                    name = self.path[len("/kernel-output/"):]
                    fake.calls.append(("GET " + self.path, {}))
                    return self._send(200, fake.kernel_outputs[name], "application/octet-stream")
                if not self.path.startswith("/files/"):
                    return self._json(404, {"code": 404, "message": "not found"})
                body, status, headers = fake.data_zip, 200, {}
                requested = self.headers.get("Range", "")
                if requested.startswith("bytes="):
                    start = int(requested[len("bytes="):].split("-")[0])
                    headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                    body, status = body[start:], 206
                headers.update({"Accept-Ranges": "bytes", "ETag": '"fake-data-v1"',
                                "Last-Modified": formatdate(1_700_000_000, usegmt=True)})
                fake.calls.append(("GET " + self.path, {"range": requested}))
                return self._send(status, body, "application/zip", headers)

            do_HEAD = do_GET

        return Handler


    def answer_datasets_and_kernels(self, method: str, body: dict) -> tuple[int, dict] | None:
        """(status, JSON) for the dataset, blob and kernel calls; None for the others."""
        if method == "GetDatasetStatus":
            ref = f"{body['ownerSlug']}/{body['datasetSlug']}"
            if ref not in self.datasets:
                return 404, {"code": 404, "message": "Not found"}
            status = self.dataset_statuses.pop(0) if len(self.dataset_statuses) > 1 else self.dataset_statuses[0]
            return 200, {"status": status}
        if method == "StartBlobUpload":
            token = f"dataset-blob-{len(self.blobs) + 1}"
            self.blobs[token] = (body["name"], b"")
            return 200, {"token": token, "createUrl": f"{self.url}/upload/{token}"}
        if method in ("CreateDataset", "CreateDatasetVersion"):
            owner = body["ownerSlug"]
            ref = f"{owner}/{body.get('slug') or body.get('datasetSlug')}"
            files = (body.get("body") or body)["files"]
            version = {"notes": (body.get("body") or {}).get("versionNotes", ""), "private": body.get("isPrivate"),
                       "files": {self.blobs[f["token"]][0]: self.blobs[f["token"]][1] for f in files}}
            self.datasets.setdefault(ref, []).append(version)
            return 200, {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"}
        if method == "SaveKernel":
            self.kernels.setdefault(body["slug"], []).append(body)
            return 200, {"ref": f"/code/{body['slug']}", "url": f"https://www.kaggle.com/code/{body['slug']}",
                         "versionNumber": len(self.kernels[body["slug"]])}
        if method == "GetKernelSessionStatus":
            status, message = self.kernel_statuses.pop(0) if len(self.kernel_statuses) > 1 else self.kernel_statuses[0]
            return 200, {"status": status, "failureMessage": message}
        if method == "ListKernelSessionOutput":
            files = [{"fileName": name, "url": f"{self.url}/kernel-output/{name}"} for name in self.kernel_outputs]
            return 200, {"files": files, "log": self.kernel_log, "nextPageToken": ""}
        return None
