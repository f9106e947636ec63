"""The review page of a round (``python -m data round review ROUND_DIR``): a Starlette app on uvicorn that
shows each generated sample on a checkerboard, on black, on white and as its alpha, with its prompt,
and records a reviewer's pick / reject / undo in the round's journal (``data.review_journal``) as it
is made.

Safety: the server listens on 127.0.0.1 unless told otherwise, and every request must carry the
random access token of the printed URL (``?token=``; compared in constant time, 403 otherwise).
Images are served only by sample id from ``round.json`` (whose files ``data.rounds.load_round``
keeps inside the round folder); no request names a path, so ``../``, absolute or encoded paths
match nothing (404) and malformed ids are refused (400). One server per round folder (a lock
file); any number of pages share it, and their decisions are written one at a time.

API (all JSON, all with ``?token=``): ``GET /api/state`` (samples, decisions, last sequence
number), ``GET /api/decisions?after=N`` (decisions after N, from every page),
``POST /api/decisions`` with ``{"sample", "decision", "after"}`` (records one decision; returns
the decisions after ``after``), ``GET /samples/ID/image.png`` and ``/samples/ID/alpha.png``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from data.review_journal import JOURNAL_NAME, UNDECIDED, DecisionJournal
from data.rounds import SAMPLE_ID, load_round

PAGE = Path(__file__).with_name("review_page.html")
LOCK_NAME = ".review.lock"
MAX_BODY_BYTES = 4096  # a decision is about 100 bytes
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# No network but this server: the page works offline and cannot leak the token to another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; connect-src 'self'; "
    "style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


class RequireToken:
    """ASGI middleware: a request without the right ``token`` query parameter gets 403, whatever its path."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            if not secrets.compare_digest(given.encode("utf-8"), self.token):
                message = ("403 Forbidden: this page needs the access token of the URL `python -m data round review` "
                           "printed (…/?token=…)\n")
                await PlainTextResponse(message, status_code=403, headers=SECURITY_HEADERS)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def review_app(round_dir: str | os.PathLike, token: str) -> Starlette:
    """The review app of ``round_dir`` for pages that know ``token``; it opens (and reconciles) the journal."""
    folder = Path(round_dir)
    manifest = load_round(folder)
    samples = {sample.id: sample for sample in manifest.samples}
    journal = DecisionJournal(folder / JOURNAL_NAME, samples)
    page = PAGE.read_text(encoding="utf-8")

    def sample_of(request: Request):
        sample_id = request.path_params["sample_id"]
        if not SAMPLE_ID.match(sample_id):
            return PlainTextResponse(f"400 Bad Request: {sample_id!r} is not a sample id\n", status_code=400)
        if sample_id not in samples:
            return PlainTextResponse(f"404 Not Found: round {manifest.name} has no sample {sample_id}\n", status_code=404)
        return samples[sample_id]

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        latest, sequence = journal.snapshot()
        return JSONResponse({
            "round": manifest.name,
            "samples": [{"id": s.id, "prompt": s.prompt, "seed": s.seed} for s in manifest.samples],
            "decisions": {sample: decision for sample, decision in latest.items() if decision != UNDECIDED},
            "sequence": sequence,
        }, headers={"Cache-Control": "no-store"})  # fmt: skip

    async def decisions(request: Request) -> Response:
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            return PlainTextResponse("400 Bad Request: after must be a whole number\n", status_code=400)
        return _events(journal, after)

    async def decide(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return PlainTextResponse(f"413: a decision is at most {MAX_BODY_BYTES} bytes\n", status_code=413)
        try:
            entry = json.loads(body)
            sample, decision, after = entry["sample"], entry["decision"], int(entry.get("after", 0))
        except (ValueError, TypeError, KeyError):
            return PlainTextResponse('400 Bad Request: send {"sample": ID, "decision": picked|rejected|undecided, '
                                     '"after": N}\n', status_code=400)
        if not isinstance(sample, str) or sample not in samples:
            return PlainTextResponse(f"404 Not Found: round {manifest.name} has no sample {sample!r}\n", status_code=404)
        try:
            await run_in_threadpool(journal.record, sample, decision)  # the fsync waits off the event loop
        except ValueError as error:
            return PlainTextResponse(f"400 Bad Request: {error}\n", status_code=400)
        return _events(journal, after)

    async def image(request: Request) -> Response:
        sample = sample_of(request)
        if isinstance(sample, Response):
            return sample
        return FileResponse(folder / sample.file, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    async def alpha(request: Request) -> Response:
        sample = sample_of(request)
        if isinstance(sample, Response):
            return sample
        content = await run_in_threadpool(_alpha_png, folder / sample.file)
        return Response(content, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        journal.close()

    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/api/decisions", decisions, methods=["GET"]),
        Route("/api/decisions", decide, methods=["POST"]),
        Route("/samples/{sample_id}/image.png", image),
        Route("/samples/{sample_id}/alpha.png", alpha),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(RequireToken, token=token)
    app.add_middleware(_SecurityHeaders)
    app.state.journal = journal
    app.state.manifest = manifest
    return app


class _SecurityHeaders:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.lower().encode() not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def _events(journal: DecisionJournal, after: int) -> Response:
    events = journal.after(after)
    sequence = events[-1].sequence if events else max(after, 0)
    return JSONResponse({"decisions": [event.to_json() for event in events], "sequence": sequence},
                        headers={"Cache-Control": "no-store"})


def _alpha_png(path: Path) -> bytes:
    with Image.open(path) as image:
        alpha = image.convert("RGBA").getchannel("A")
    buffer = io.BytesIO()
    alpha.save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def review_lock(round_dir: Path):
    """Hold the round's review lock: a second server on the same folder would write the journal beside this one."""
    handle = open(round_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"another `python -m data round review` is serving {round_dir} (it holds {round_dir / LOCK_NAME});"
                         " open the URL it printed (every reviewer can use it at once), or stop it first") from None
    try:
        yield
    finally:
        handle.close()


def serve(round_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          announce: Callable[[str], None] = print) -> None:
    """Serve the review page of ``round_dir`` until interrupted; ``announce`` gets the URL (with the token)."""
    folder = Path(round_dir)
    load_round(folder)  # a missing or broken round.json is reported before anything is locked
    token = secrets.token_urlsafe(24)
    with review_lock(folder):
        app = review_app(folder, token)
        journal, manifest = app.state.journal, app.state.manifest
        listener = _listen(host, port)
        bound_port = listener.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        counts = journal.counts()
        first = next((s.index for s in manifest.samples if journal.decision_of(s.id) == UNDECIDED), None)
        if journal.torn_bytes:
            announce(f"dropped a decision cut short by a crash ({journal.torn_bytes} bytes at the end of {journal.path}); "
                     "the page never saw it saved")
        resume = f"the page opens at sample {first + 1:,}" if first is not None else "every sample has a decision"
        announce(f"round {manifest.name}: {len(manifest.samples) - counts[UNDECIDED]:,} of {len(manifest.samples):,} decided, "
                 f"{counts['picked']:,} picked; {resume}")
        if host not in LOOPBACK:
            announce(f"warning: listening on {host}, reachable from other machines over plain HTTP; the token is the only "
                     "protection. Prefer the default 127.0.0.1 and an SSH tunnel (ssh -L)")
        announce(f"review at http://{shown_host}:{bound_port}/?token={token}  (Ctrl-C stops the server; decisions are saved)")
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        uvicorn.Server(config).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    # bound and listening before the URL is printed, so a page opened at once is queued, not refused
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port (0: any free one)") from None
    listener.listen(128)
    return listener
