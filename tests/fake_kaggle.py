"""A fake Kaggle API on loopback that speaks only the calls the real `kaggle` client makes for this kit.

The real client (kaggle 2.x with KAGGLE_API_ENVIRONMENT=LOCALHOST) POSTs JSON to
`/api/v1/competitions.CompetitionApiService/<Method>`; uploads PUT to the URL StartSubmissionUpload returns; the data
download is a redirect to a file URL. Everything is recorded so tests can assert what reached the "server".
"""

from __future__ import annotations

import json
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_PREFIX = "/api/v1/competitions.CompetitionApiService/"


class FakeKaggle:
    def __init__(self, data_zip: bytes = b"", fail_status: int | None = None):
        self.data_zip = data_zip
        self.fail_status = fail_status          # answer every API call with this HTTP status (e.g. 403)
        self.calls: list[tuple[str, dict]] = []  # (method name, JSON body)
        self.uploads: dict[str, bytes] = {}     # token → uploaded bytes
        self.submissions: list[dict] = []
        self.auth_headers: list[str] = []
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
                method = self.path[len(API_PREFIX):]
                body = json.loads(self._body() or b"{}")
                fake.calls.append((method, body))
                fake.auth_headers.append(self.headers.get("Authorization", ""))
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
                if method == "DownloadDataFiles":
                    self.send_response(302)
                    self.send_header("Location", f"{fake.url}/files/histopathologic-cancer-detection.zip")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._json(404, {"code": 404, "message": f"the fake does not speak {method}"})

            def do_PUT(self):
                token = self.path.rsplit("/", 1)[-1]
                if token not in fake.uploads:
                    return self._json(404, {"code": 404, "message": "unknown upload"})
                fake.uploads[token] += self._body()
                return self._json(200, {})

            def do_GET(self):
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
