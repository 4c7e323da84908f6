"""The search server: one FastAPI app over one loaded model and one image index (``create_app``).

The model and the index are loaded once. All model and index work runs in one worker thread, so the event
loop only parses requests; concurrent text queries wait up to ``batch_wait_ms`` for each other and go
through the caption encoder together (up to ``max_batch``), which costs a fraction per caption of one
forward each. Each query first stats the index manifest: a version swapped in by ``llm2clip index add`` is
read whole, then used (under a lock), without a restart; a half-written one is never seen (see
search.index.ImageIndex.open).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import Llm2ClipError
from ..search.index import ImageIndex, index_stamp, query_truncated

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_TEXT_CHARS = 20_000  # far past any caption encoder's max_length; longer is a client bug, not a caption
MAX_TEXTS = 64
MAX_K = 1000


@dataclass
class ServeSettings:
    batch_wait_ms: float = 5.0  # how long a text query waits for others to share its forward
    max_batch: int = 32  # texts per caption-encoder call; 1 turns micro-batching off
    # "padded": a micro-batch is one forward (left padding, masked: the same vectors within float error);
    # "exact" keeps the encoder's default, one forward per distinct token count; None: as recorded
    text_batching: str | None = "padded"
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 40_000_000  # below PIL's own bomb limit, checked before decoding
    thumb_size: int = 256


# ------------------------------------------------------------------------------------ request/response
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _non_empty(v: str | None) -> str | None:
    if v is not None and not v.strip():
        raise ValueError("empty text")
    if v is not None:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: JSON allows it, the tokenizer does not
            raise ValueError("text is not valid Unicode (lone surrogate)") from None
    return v


class SearchRequest(_Strict):
    """A text query, or ``row``: the image at that row of the index (a result clicked in the page)."""

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="caption-like query, up to the "
                             "caption encoder's max_length tokens (longer ones are cut: see `truncated`)")
    row: int | None = Field(None, ge=0, description="search by the indexed image at this row")
    k: int = Field(10, ge=1, le=MAX_K, description="results to return")

    _check_text = field_validator("text")(_non_empty)


class EmbedTextRequest(_Strict):
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)

    @field_validator("texts")
    @classmethod
    def _check(cls, v: list[str]) -> list[str]:
        for i, t in enumerate(v):
            try:
                _non_empty(t)
            except ValueError as err:
                raise ValueError(f"text {i}: {err}") from None
            if len(t) > MAX_TEXT_CHARS:
                raise ValueError(f"text {i} is longer than {MAX_TEXT_CHARS} characters")
        return v


class HitOut(BaseModel):
    rank: int
    score: float = Field(description="cosine similarity")
    file: str = Field(description="relative to the index's image folder")
    row: int = Field(description="the image's row in the index; its thumbnail is /v1/thumb/{row}")


class SearchResponse(BaseModel):
    query: Literal["text", "image", "row"]
    truncated: bool = Field(description="the text query was cut at the caption encoder's max_length")
    hits: list[HitOut]
    images: int = Field(description="images in the index version searched")
    index_version: int
    latency_ms: float = Field(description="time spent in the server")


class EmbedTextResponse(BaseModel):
    dim: int
    embeddings: list[list[float]] = Field(description="L2-normalised, one per text")
    truncated: list[bool]


class EmbedImageResponse(BaseModel):
    dim: int
    embedding: list[float]


class Health(BaseModel):
    status: str
    model: str
    images: int
    index_version: int
    text_queries: int
    text_batches: int = Field(description="caption-encoder calls so far (fewer than text_queries when batched)")
    reloads: int


class _Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------- service
class SearchService:
    """The loaded model and index, the model thread and the text micro-batcher."""

    def __init__(self, lm, index_path: str | Path, settings: ServeSettings | None = None):
        self.lm, self.path = lm, Path(index_path)
        self.settings = settings or ServeSettings()
        if self.settings.max_batch < 1 or self.settings.batch_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and batch_wait_ms >= 0")
        self.index = ImageIndex.open(self.path)
        self.index.check_model(lm)  # an index of another model is refused here, naming both
        # a results page asks for many thumbnails at once, each a full decode of its original: a few at a time
        self._thumb_slots = threading.BoundedSemaphore(THUMB_DECODES)
        enc = lm.caption_encoder  # loaded now, not by the first query
        cfg = getattr(enc, "config", None)
        if self.settings.text_batching and cfg is not None and "batching" in type(cfg).model_fields:
            enc.config = cfg.model_copy(update={"batching": self.settings.text_batching})
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llm2clip-model")
        self.stats = {"text_queries": 0, "text_batches": 0, "reloads": 0}
        self._lock = threading.Lock()
        self._refused_stamp = None
        self._pending: list = []
        self._drainer: asyncio.Task | None = None

    # -------------------------------------------------------------------------------- hot reload
    def current(self) -> ImageIndex:
        """The index, first replaced by a new version when one was swapped in (one stat per call)."""
        stamp = index_stamp(self.path)
        if stamp is None or stamp == self.index.stamp or stamp == self._refused_stamp:
            return self.index  # mid-swap (no manifest for a moment) or unchanged
        with self._lock:
            if index_stamp(self.path) not in (self.index.stamp, self._refused_stamp, None):
                try:
                    new = ImageIndex.open(self.path)
                    new.check_model(self.lm)
                except Exception as err:  # whatever is wrong with the new version, the old one keeps serving
                    self._refused_stamp = stamp
                    log.error("not switching to the new index version: %s", err)
                else:
                    old, self.index = self.index, new
                    self.stats["reloads"] += 1
                    log.info("index %s: version %d -> %d (%d images)", self.path, old.version, new.version, len(new))
        return self.index

    # ---------------------------------------------------------------------------- model thread work
    def _text_batch(self, items: list[tuple[str, int | None]]) -> list:
        """Embed (and search for) a batch of texts; a text that fails alone fails alone."""
        texts = [t for t, _ in items]
        try:
            emb = self.lm.encode_text(texts, batch_size=len(texts))
            cut = query_truncated(self.lm, texts)
        except Exception:  # whatever one text raises stays with that text: the others are run alone
            if len(items) == 1:
                raise
            return [self._one(self._text_batch, it) for it in items]
        self.stats["text_batches"] += 1
        self.stats["text_queries"] += len(texts)
        idx = self.current()
        want = [i for i, (_, k) in enumerate(items) if k]
        hits = dict(zip(want, idx.search(emb[want], max(items[i][1] for i in want)))) if want else {}
        return [(emb[i], cut[i], hits[i][: items[i][1]] if i in hits else None, idx) for i in range(len(items))]

    @staticmethod
    def _one(fn, item):
        try:
            return fn([item])[0]
        except Exception as err:
            return err

    def _image_query(self, data: bytes, k: int | None):
        pil = read_upload(data, self.settings.max_image_pixels)
        emb = self.lm.encode_image([pil])
        idx = self.current()
        return emb[0], (idx.search(emb, k)[0] if k else None), idx

    def _row_query(self, row: int, k: int):
        idx = self.current()
        if row >= len(idx):
            raise _Rejected(404, f"row {row}: the index holds {len(idx)} images (rows 0-{len(idx) - 1})")
        return idx.search(idx.index.reconstruct(row)[None], k)[0], idx

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------------------ micro-batching
    async def texts(self, texts: list[str], k: int | None = None) -> list:
        """(embedding, truncated, hits or None, index) per text, through the shared batches."""
        loop = asyncio.get_running_loop()
        futures = []
        for t in texts:
            fut = loop.create_future()
            self._pending.append((t, k, fut))
            futures.append(fut)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        s = self.settings
        try:
            while self._pending:
                if len(self._pending) < s.max_batch and s.batch_wait_ms > 0:
                    await asyncio.sleep(s.batch_wait_ms / 1000)  # let concurrent queries join
                batch, self._pending = self._pending[: s.max_batch], self._pending[s.max_batch :]
                try:
                    results = await self.run(self._text_batch, [(t, k) for t, k, _ in batch])
                except Exception as err:
                    results = [err] * len(batch)
                for (*_, fut), res in zip(batch, results):
                    if not fut.done():
                        (fut.set_exception if isinstance(res, BaseException) else fut.set_result)(res)
        finally:
            self._drainer = None

    # ---------------------------------------------------------------------------------- thumbnails
    def thumbnail(self, row: int, size: int) -> bytes:
        idx = self.current()
        if row >= len(idx):
            raise _Rejected(404, f"row {row}: not in the index ({len(idx)} images)")
        path = idx.images_dir / idx.files[row]  # only files the index holds are ever read
        with self._thumb_slots:
            return self._thumbnail(path, row, size)

    @staticmethod
    def _thumbnail(path: Path, row: int, size: int) -> bytes:
        from PIL import Image

        from ..fileio import image_errors, open_image

        try:
            im = open_image(path)
        except FileNotFoundError:
            raise _Rejected(404, f"row {row}: the image file is gone") from None
        except image_errors() as err:
            raise _Rejected(404, f"row {row}: unreadable image: {err}") from None
        im.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        return buf.getvalue()


THUMB_DECODES = 4  # thumbnails decoded at once

UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def read_upload(data: bytes, max_pixels: int):
    """An uploaded image as RGB; its size is checked from the header before any pixel is decoded."""
    from PIL import Image

    from ..fileio import image_errors, open_image

    if not data:
        raise _Rejected(400, "the uploaded file is empty")
    try:
        # raster formats only: Pillow would hand an EPS upload to Ghostscript
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            w, h = im.size
    except Image.DecompressionBombError as err:
        raise _Rejected(413, f"image too large: {err}") from None
    except image_errors() as err:
        raise _Rejected(400, f"not a readable image: {err}") from None
    if w * h > max_pixels:
        raise _Rejected(413, f"image too large: {w}x{h} pixels; the limit is {max_pixels} pixels")
    try:
        return open_image(data)
    except image_errors() as err:
        raise _Rejected(400, f"not a readable image: {err}") from None


# ---------------------------------------------------------------------------------------- body limit
class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with a 413, declared or streamed, before the app reads them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        msg = f"request body over {self.limit} bytes"
        await JSONResponse({"detail": msg}, status_code=413)(scope, receive, send)


# ------------------------------------------------------------------------------------------------ app
MULTIPART_SCHEMA = {"type": "object", "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"},
                                   "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": MAX_K}}}


async def _read_form(request: Request, allowed: set[str]) -> dict:
    try:
        form = await request.form(max_files=1, max_fields=len(allowed))
    except Exception as err:
        raise _Rejected(400, f"malformed form: {err}") from None
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise _Rejected(422, f"unknown form field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return dict(form)


async def _image_bytes(form: dict) -> bytes:
    up = form.get("image")
    if up is None or isinstance(up, str):
        raise _Rejected(422, "field 'image' must be an uploaded file")
    return await up.read()


def _form_k(form: dict) -> int:
    try:
        k = int(form.get("k", 10))
    except ValueError:
        raise _Rejected(422, "k must be an integer") from None
    if not 1 <= k <= MAX_K:
        raise _Rejected(422, f"k must be between 1 and {MAX_K}")
    return k


async def _json_body(request: Request, model: type[BaseModel]):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _Rejected(400, f"the body is not JSON: {err}") from None
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise HTTPException(422, err.errors(include_url=False, include_context=False, include_input=False)) from None


def _hits(hits) -> list[HitOut]:
    return [HitOut(rank=h.rank, score=h.score, file=h.file, row=h.row) for h in hits]


def create_app(lm, index_path: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The app over a loaded model (llm2clip.load) and the index folder it built."""
    service = SearchService(lm, index_path, settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llm2clip search", version="1", lifespan=lifespan,
                  description="Search an image index by long captions (through the LLM caption encoder) or by "
                              "image, and embed texts and images.")
    app.state.service = service

    @app.exception_handler(_Rejected)
    async def rejected(request, err: _Rejected):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        # where and what only: echoing the input back could not even be encoded for some inputs (lone surrogates)
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Llm2ClipError)
    async def input_error(request, err: Llm2ClipError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        idx = service.index
        return Health(status="ok", model=str(lm.path), images=len(idx), index_version=idx.version, **service.stats)

    @app.post("/v1/search", response_model=SearchResponse, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()},
        "multipart/form-data": {"schema": MULTIPART_SCHEMA}}}})
    async def search(request: Request) -> SearchResponse:
        """Top k images for a text (JSON ``{"text": ..., "k": 10}``), an indexed image (JSON ``{"row": 3}``)
        or an uploaded image (multipart form: ``image`` file, ``k``)."""
        t0 = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        truncated = False
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await _read_form(request, {"image", "k"})
            data, k = await _image_bytes(form), _form_k(form)
            _, hits, idx = await service.run(service._image_query, data, k)
            query = "image"
        elif kind == "application/json":
            req = await _json_body(request, SearchRequest)
            if (req.text is None) == (req.row is None):
                raise _Rejected(422, "give exactly one of 'text' and 'row' (or upload an image as a form)")
            if req.text is not None:
                (_, truncated, hits, idx), = await service.texts([req.text], req.k)
                query = "text"
            else:
                hits, idx = await service.run(service._row_query, req.row, req.k)
                query = "row"
        else:
            raise _Rejected(415, "send JSON (a text or a row) or a multipart form (an image)")
        return SearchResponse(query=query, truncated=truncated, hits=_hits(hits), images=len(idx),
                              index_version=idx.version, latency_ms=round((time.perf_counter() - t0) * 1000, 2))

    @app.post("/v1/embed/text", response_model=EmbedTextResponse)
    async def embed_text(req: EmbedTextRequest) -> EmbedTextResponse:
        """L2-normalised embeddings of texts (through the same batches as text searches)."""
        res = await service.texts(req.texts)
        return EmbedTextResponse(dim=lm.embed_dim, embeddings=[r[0].tolist() for r in res],
                                 truncated=[r[1] for r in res])

    image_only = {"type": "object", "required": ["image"],
                  "properties": {"image": MULTIPART_SCHEMA["properties"]["image"]}}

    @app.post("/v1/embed/image", response_model=EmbedImageResponse, openapi_extra={"requestBody": {
        "required": True, "content": {"multipart/form-data": {"schema": image_only}}}})
    async def embed_image(request: Request) -> EmbedImageResponse:
        """The L2-normalised embedding of an uploaded image (multipart form field ``image``)."""
        form = await _read_form(request, {"image"})
        emb, _, _ = await service.run(service._image_query, await _image_bytes(form), None)
        return EmbedImageResponse(dim=lm.embed_dim, embedding=emb.tolist())

    @app.get("/v1/thumb/{row}", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumb(row: int, size: int = 256) -> Response:
        """A JPEG thumbnail of the indexed image at ``row`` (only files the index holds are served)."""
        if row < 0 or not 16 <= size <= 1024:
            raise _Rejected(422, "row must be >= 0 and size between 16 and 1024")
        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(service.thumbnail, row, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=service.settings.max_body_bytes)
    return app
