"""``salient api``: the HTTP API for other services (FastAPI): submit jobs, follow them, page their results
and errors, fetch a map or an overlay drawn on demand, cancel them. Light like the rest of the producer: no
torch, no workers (drawing an overlay imports OpenCV when one is asked for).

Every ``/jobs`` route needs ``Authorization: Bearer TOKEN`` with one of ``SALIENT_API_TOKENS``, compared in
constant time. A request body over ``SALIENT_API_MAX_BODY_BYTES`` gets 413: on its Content-Length header
before any of it is read, or as soon as a body sent without one passes the limit. Clients name images,
manifests, weights and labels by ``s3://`` and ``http(s)://`` URIs only: never paths on the servers' disks.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import tempfile
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime
from http.client import InvalidURL
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Iterator, Literal, TypeVar
from urllib.parse import urlparse

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import KombuError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from salient_maps.storage.database import Item, cancel_job, connect
from salient_maps.storage.maps import MapReader
from salient_maps.storage.results import find_job, find_record, iter_results
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, iter_entries, read_uri

from .jobs import JobProgress, get_job
from .submit import build_spec, submit

log = logging.getLogger(__name__)
MAX_PAGE = 1000

# No NUL characters anywhere: PostgreSQL text cannot hold them.
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
# S3 keys may hold spaces; a URL must have them percent-encoded.
RemoteUri = Annotated[str, StringConstraints(pattern=r"^(s3://[^\x00]+|https?://[^\x00-\x20\x7f]+)$")]
ManifestUri = Annotated[str, StringConstraints(
    pattern=r"^(s3://[^\x00?#]+|https?://[^\x00-\x20\x7f?#]+)\.(txt|csv|jsonl)([?#][^\x00-\x20\x7f]*)?$")]
MethodName = Annotated[str, StringConstraints(pattern=r"^[^\x00,\s]+$")]
MethodList = Annotated[str, StringConstraints(pattern=r"^[^\x00]*[^\x00,\s][^\x00]*$")]  # names one at least
JobId = Annotated[uuid.UUID, PathParam(description="The job id.")]
# items.id is a 32-bit INTEGER column
Cursor = Annotated[int, Query(ge=0, le=2**31 - 1, description="next_cursor of the previous page; 0 for the first.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Images per page.")]
Sha256 = Annotated[str, Query(pattern=r"^[0-9a-f]{64}$", description="The image's sha256, as in its records.")]
MethodQuery = Annotated[str, Query(pattern=r"^[a-z0-9_]{1,100}$", description="The method's name, e.g. gradcam.")]
ClassId = Annotated[int, Query(ge=0, le=2**31 - 1, description="The class id, as in the records.")]


T = TypeVar("T")
RGB = Annotated[list[T], Field(min_length=3, max_length=3)]


class JobRequest(BaseModel):
    """A job: images as inline URIs and/or a manifest, and the options of ``salient submit``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": ["uris"], "properties": {"uris": {"minItems": 1}}},
        {"required": ["manifest"], "properties": {"manifest": {"type": "string"}}}]})

    uris: list[RemoteUri] = Field(default_factory=list,
                                  description="Image URIs; an s3://bucket/prefix stands for the images under it.")
    manifest: ManifestUri | None = Field(
        None, description="A .txt, .csv or .jsonl manifest of absolute image URIs, as `salient submit` reads them.")
    name: Annotated[Text, StringConstraints(max_length=200)] | None = Field(
        None, description="A name to find the job by.")
    chunk: int | None = Field(None, ge=1, description="Images per message (default SALIENT_CHUNK_SIZE).")
    model: Text = "efficientnet_lite0"
    weights: RemoteUri | None = Field(None, description="State dict the workers download.")
    layer: Text | None = None
    input_size: int | None = Field(None, ge=16, le=4096,
                                   description="Model input side in pixels (default: the model's own).")
    mean: RGB[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, description="Input normalisation mean [R, G, B] (default: the model's own).")
    std: RGB[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = Field(
        None, description="Input normalisation std [R, G, B] (default: the model's own).")
    crop: Literal["whole", "center", "squash"] | None = Field(
        None, description="whole image, or a centre crop after resizing the short side (center) or both sides "
                          "(squash) to resize (default: the model's own eval transform; whole without metadata).")
    resize: int | None = Field(None, ge=16, le=8192, description="Side before a center or squash crop.")
    interpolation: Literal["area", "bilinear", "bicubic"] | None = Field(
        None, description="Resize filter (default: the model's own; area without metadata).")
    methods: MethodList | Annotated[list[MethodName], Field(min_length=1)] = Field(
        "gradcam,saliency", description="Comma-separated or a list; 'all' for every method.")
    topk: int = Field(3, ge=1, le=1000)
    classes: Text | list[int | Text] | None = Field(None, description="Ids or names to explain instead of the top-k.")
    with_label: bool = Field(False, description="Also explain each image's ground-truth label (manifest 'label'); "
                             "classes 'label' explains only that.")
    labels: RemoteUri | None = Field(None, description="Class names for a custom model (JSON list or CSV id,name).")
    localize: bool = False
    score: Literal["logit", "probability"] | None = None
    scorecam_weights: Literal["probability", "logit-softmax", "cic-softmax"] | None = None
    max_channels: int | None = Field(None, ge=1)
    masked_batch: int | None = Field(None, ge=1)
    smooth: int | None = Field(None, ge=0)
    noise: float | None = Field(None, ge=0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1)
    baseline: Literal["black", "blurred"] | None = None
    metrics: Text | None = Field(None, description="Comma-separated: deletion,insertion,drop.")
    metric_steps: int | None = Field(None, ge=1)
    metric_baseline: Literal["black", "blurred"] | None = None
    colormap: Text | None = None
    alpha: float | None = Field(None, ge=0, le=1)
    polarity: Literal["positive", "negative", "both"] | None = None
    clip_upper: float | None = Field(None, ge=0, le=100)
    clip_lower: float | None = Field(None, ge=0, le=100)
    overlay: Literal["original", "grayscale", "mask-black", "none"] | None = None
    overlays: Literal["none", "store"] | None = Field(
        None, description="store: the workers also write every map's overlay PNG, one tar per batch beside its "
                          "shard (overlays/<ab>/<digest>.tar); default none: drawn on demand (GET /jobs/{id}/overlay).")
    batch_size: int = Field(16, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _names_images(self) -> "JobRequest":
        if not self.uris and self.manifest is None:
            raise ValueError("give uris, a manifest, or both")
        return self


class JobStatus(BaseModel):
    id: str
    name: str | None
    status: str = Field(description="listing (images still being queued), running, finished or cancelled")
    total: int
    done: int
    failed: int
    skipped: int = Field(description="Already explained with the same settings (the earlier result stands), "
                                     "or cancelled.")
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, job: JobProgress) -> "JobStatus":
        return cls(**vars(job))


class ResultRecord(BaseModel):
    """One explanation, or one image without any (failed, pending); as ``salient results`` prints them."""

    job_id: str
    uri: str
    sha256: str | None
    model: str | None
    method: str | None = Field(description="The method's plain name: gradcam, saliency, scorecam, ...")
    method_params: dict | None = Field(description="The method's parameters (e.g. {\"score\": \"logit\"}).")
    layer: str | None
    class_id: int | None
    class_name: str | None
    score: float | None
    rank: int | None
    shard: str | None = Field(description="Object key of the result shard (safetensors) holding the map.")
    slot: int | None = Field(description="The map's place in its shard (GET /jobs/{id}/overlay draws it).")
    status: str
    error: str | None
    seconds: float | None
    layout: dict | None = Field(description="How the target layer's output became B×C×h×w (e.g. tokens with their "
                                            "prefix count, channels_last).")
    preprocessing: dict | None = Field(description="Input size, resize, crop, interpolation, mean and std applied.")
    input_box: list[float] | None = Field(description="The part of the image the model saw, [x0, y0, x1, y1] as "
                                                      "fractions of its width and height.")
    deletion_auc: float | None
    insertion_auc: float | None
    drop: float | None
    increase: bool | None
    pointing_game: int | None = Field(description="1 when the map's maximum lies within 15 px of a box or the mask.")
    energy_in_box: float | None = Field(description="Share of the map's positive mass inside the boxes or mask.")
    localization_iou: float | None = Field(description="IoU of the --localize box with the best ground-truth box.")
    localization_correct: int | None = Field(description="1 when localization_iou >= 0.5.")
    border_energy: float | None = Field(description="Share of the map's positive mass in the image's outer 10 %.")
    label: int | None = Field(description="The manifest's label as a class id.")
    correct: bool | None = Field(description="Whether the top-1 class equals the label.")
    boxes: list[list[float]] | None = Field(description="Ground-truth boxes [x0, y0, x1, y1] in original pixels.")
    mask: str | None = Field(description="URI of the ground-truth mask PNG.")
    localization_box: list[float] | None = Field(description="The --localize GrabCut box in original pixels.")
    localization_mask: str | None = Field(description="The --localize mask PNG's tensor in the record's shard "
                                                      "(GET /jobs/{id}/localization_mask returns it).")


class ResultsPage(BaseModel):
    records: list[ResultRecord]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class ErrorRecord(BaseModel):
    uri: str
    sha256: str | None
    error: str | None
    seconds: float | None


class ErrorsPage(BaseModel):
    errors: list[ErrorRecord]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class ErrorDetail(BaseModel):
    detail: str


def api_tokens(settings: Settings) -> list[str]:
    raw = settings.api_tokens.get_secret_value() if settings.api_tokens else ""
    return [token.strip() for token in raw.split(",") if token.strip()]


def _bearer_check(tokens: list[str]):
    """A dependency that lets a request through only with one of ``tokens`` as its bearer token."""
    # Digests have one length, so compare_digest's time does not depend on the tokens' lengths either.
    digests = [hashlib.sha256(token.encode()).digest() for token in tokens]
    bearer = HTTPBearer(auto_error=False, description="One of SALIENT_API_TOKENS.")

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = hashlib.sha256(credentials.credentials.encode() if credentials else b"").digest()
        matches = [hmac.compare_digest(given, digest) for digest in digests]  # every one: no early exit
        if credentials is None or not any(matches):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(settings: Settings | None = None, insecure_no_auth: bool = False) -> FastAPI:
    """The API on the database and broker of ``settings``. Without tokens it refuses, unless
    ``insecure_no_auth`` (then anyone who can reach it may submit and cancel jobs)."""
    settings = settings or Settings()
    tokens = api_tokens(settings)
    if not tokens and not insecure_no_auth:
        raise ValueError("no API tokens: set SALIENT_API_TOKENS (comma-separated)")
    db = connect(settings.resolved_database_url)
    guard = [Depends(_bearer_check(tokens))] if tokens else []
    app = FastAPI(title="salient", version="1", max_body_size=settings.api_max_body_bytes,
                  description="Saliency maps for image classifiers as a queued bulk job.",
                  generate_unique_id_function=lambda route: route.name)
    app.add_middleware(ContentLengthLimit, max_bytes=settings.api_max_body_bytes)
    app.add_exception_handler(RequestValidationError, _unprocessable_answer)

    def answer(description: str) -> dict[str, Any]:
        return {"model": ErrorDetail, "description": description}

    read_responses: dict[int | str, dict[str, Any]] = {401: answer("Missing or wrong bearer token"),
                                                       404: answer("No such job")}

    def job_or_404(job_id: uuid.UUID) -> JobProgress:
        try:
            return get_job(db, str(job_id))
        except LookupError:
            raise HTTPException(404, f"no job {job_id}") from None

    @app.post("/jobs", status_code=201, response_model=JobStatus, dependencies=guard, responses={
        401: answer("Missing or wrong bearer token"), 400: answer("A source the servers cannot list or read"),
        413: answer("Body over SALIENT_API_MAX_BODY_BYTES"),
        503: answer("Broker or storage unreachable; the job was cancelled")})
    def submit_job(request: JobRequest, response: Response) -> JobStatus:
        """Queue the images for the workers; answers once every image is queued (a big S3 listing takes a while)."""
        options = request.model_dump(exclude={"uris", "manifest", "name", "chunk"})
        try:
            with _manifest_source(request.manifest, settings) as manifest:
                job_id = submit(request.uris + ([manifest] if manifest else []), build_spec(**options),
                                name=request.name, chunk=request.chunk, settings=settings, db=db)
        except RequestValidationError:
            raise
        except (SourceError, ValueError, ParamValidationError, InvalidURL) as exc:
            raise HTTPException(400, str(exc)) from None
        except ClientError as exc:  # S3 answered: a 4xx is about the request (e.g. a malformed bucket name)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            raise HTTPException(400 if 400 <= status < 500 else 503, str(exc)) from None
        except (KombuError, BotoCoreError, DBAPIError, OSError) as exc:
            # The details (hosts, SQL) go to the server's log, not to the client.
            log.error("POST /jobs: %s: %s", type(exc).__name__, exc)
            raise HTTPException(503, f"broker, storage or database unavailable ({type(exc).__name__}); "
                                     "try again: any job this request started was cancelled") from None
        response.headers["Location"] = f"/jobs/{job_id}"
        return JobStatus.of(get_job(db, job_id))

    @app.get("/jobs/{job_id}", response_model=JobStatus, dependencies=guard, responses=read_responses)
    def get_job_status(job_id: JobId) -> JobStatus:
        """Status and counts."""
        return JobStatus.of(job_or_404(job_id))

    @app.get("/jobs/{job_id}/results", response_model=ResultsPage, dependencies=guard, responses=read_responses)
    def get_job_results(job_id: JobId, cursor: Cursor = 0, limit: Limit = 100) -> ResultsPage:
        """A page of ``limit`` images in submission order: one record per explanation (methods × classes),
        or one record for an image without any. A skipped image reports the earlier, identical result."""
        job_or_404(job_id)
        ids = _item_ids(db, str(job_id), cursor, limit + 1)
        if not ids:
            return ResultsPage(records=[], next_cursor=None)
        page = ids[:limit]
        records = iter_results(settings, str(job_id), db=db, item_range=(cursor, page[-1]))
        return ResultsPage(records=[ResultRecord(**r) for r in records],
                           next_cursor=page[-1] if len(ids) > limit else None)

    @app.get("/jobs/{job_id}/errors", response_model=ErrorsPage, dependencies=guard, responses=read_responses)
    def get_job_errors(job_id: JobId, cursor: Cursor = 0, limit: Limit = 100) -> ErrorsPage:
        """A page of the images that failed, with the reason."""
        job_or_404(job_id)
        with db.connect() as conn:
            rows = conn.execute(
                select(Item.id, Item.uri, Item.sha256, Item.error, Item.seconds)
                .where(Item.job_id == str(job_id), Item.status == "failed", Item.id > cursor)
                .order_by(Item.id).limit(limit + 1)).all()
        return ErrorsPage(errors=[ErrorRecord(uri=r.uri, sha256=r.sha256, error=r.error, seconds=r.seconds)
                                  for r in rows[:limit]],
                          next_cursor=rows[limit - 1].id if len(rows) > limit else None)

    @app.get("/jobs/{job_id}/overlay", dependencies=guard, response_class=Response, responses={
        **read_responses, 200: {"content": {"image/png": {}}, "description": "The overlay, drawn now"},
        501: answer("This server cannot draw overlays (no OpenCV)")})
    def get_overlay(job_id: JobId, sha256: Sha256, method: MethodQuery, class_id: ClassId) -> Response:
        """One explanation's overlay as PNG, drawn on demand from its stored map and the image's thumbnail in
        the job's overlay style. ``sha256``, ``method``, ``class_id``: as in the job's result records."""
        return Response(_drawn(job_id, sha256, method, class_id, "png"), media_type="image/png")

    @app.get("/jobs/{job_id}/map", dependencies=guard, response_class=Response, responses={
        **read_responses, 200: {"content": {"application/octet-stream": {}},
                                "description": "The map as a float32 .npy file"}})
    def get_map(job_id: JobId, sha256: Sha256, method: MethodQuery, class_id: ClassId,
                size: Literal["input", "layer"] = "input") -> Response:
        """One explanation's map as a .npy file (float32 in [0, 1]): at the model's input size or as computed."""
        return Response(_drawn(job_id, sha256, method, class_id, size), media_type="application/octet-stream")

    @app.get("/jobs/{job_id}/localization_mask", dependencies=guard, response_class=Response, responses={
        **read_responses, 200: {"content": {"image/png": {}}, "description": "The mask, 255 on the object"}})
    def get_localization_mask(job_id: JobId, sha256: Sha256, method: MethodQuery, class_id: ClassId) -> Response:
        """One explanation's --localize GrabCut mask as an 8-bit grey PNG at the image's own size."""
        return Response(_drawn(job_id, sha256, method, class_id, "mask"), media_type="image/png")

    reader = MapReader.for_settings(settings)
    reader_lock = threading.Lock()

    def _drawn(job_id: uuid.UUID, sha256: str, method: str, class_id: int, what: str) -> bytes:
        with db.connect() as conn:
            try:
                record = find_record(conn, find_job(conn, str(job_id)), sha256, method, class_id)
            except LookupError:
                raise HTTPException(404, f"no job {job_id}") from None
        if record is None:
            raise HTTPException(404, f"job {job_id} has no {method} map of class {class_id} for image {sha256}")
        with reader_lock:  # its shard cache is not thread-safe; one shard serves many requests in a row
            if what == "mask":
                try:
                    return reader.localization_mask_png(record)
                except LookupError as exc:
                    raise HTTPException(404, str(exc)) from None
            if what == "png":
                try:
                    from salient_maps.storage.overlays import OverlayStyle
                except ModuleNotFoundError:
                    raise HTTPException(501, "drawing overlays needs OpenCV on the API server "
                                             "(pip install opencv-python-headless)") from None
                return reader.overlay_png(record, OverlayStyle(**record["style"]))
            buffer = io.BytesIO()
            np.save(buffer, reader.map(record, what), allow_pickle=False)
            return buffer.getvalue()

    @app.delete("/jobs/{job_id}", response_model=JobStatus, dependencies=guard, responses=read_responses)
    def delete_job(job_id: JobId) -> JobStatus:
        """Cancel: images no worker has started are skipped now; the ones being explained finish."""
        if cancel_job(db, str(job_id)) is None:
            raise HTTPException(404, f"no job {job_id}")
        return JobStatus.of(get_job(db, str(job_id)))

    return app


def _item_ids(db: Engine, job_id: str, after: int, limit: int) -> list[int]:
    with db.connect() as conn:
        return list(conn.execute(select(Item.id).where(Item.job_id == job_id, Item.id > after)
                                 .order_by(Item.id).limit(limit)).scalars())


async def _unprocessable_answer(request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 without the echo of each bad input: that can be large, or a number such as 1e400 that
    JSON cannot carry back (FastAPI's own handler then fails with a 500)."""
    if not isinstance(exc, RequestValidationError):  # registered for that class only
        raise exc
    errors = [{key: error[key] for key in ("type", "loc", "msg")} for error in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def _unprocessable(loc: tuple, message: str) -> RequestValidationError:
    """A 422 shaped like FastAPI's own, for what only shows once a manifest is read."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": message}])


@contextmanager
def _manifest_source(manifest: str | None, settings: Settings) -> Iterator[str | None]:
    """The manifest fetched into a temporary file ``submit`` can read, once every entry is checked to be an
    absolute s3:// or http(s):// URI (a relative one would name a file next to the copy)."""
    if manifest is None:
        yield None
        return
    suffix = PurePosixPath(urlparse(manifest).path).suffix
    data = read_uri(manifest, settings.api_max_manifest_bytes, settings)
    with tempfile.TemporaryDirectory(prefix="salient-manifest-") as folder:
        path = Path(folder) / f"manifest{suffix}"
        path.write_bytes(data)
        del data
        for n, entry in enumerate(iter_entries([str(path)], settings), 1):
            # The message names the entry by number only: the manifest's text stays the client's business.
            mask = (entry.truth or {}).get("mask")
            if any(urlparse(uri).scheme not in ("s3", "http", "https") for uri in (entry.uri, mask) if uri):
                raise _unprocessable(("manifest",), f"entry {n} is not an absolute s3:// or http(s):// URI")
        yield str(path)


class ContentLengthLimit:
    """413 on the Content-Length header alone, before a byte of the body is read, as JSON like every other
    error here. A body without the header is counted as it streams (FastAPI's ``max_body_size``)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
