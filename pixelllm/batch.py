"""Batch client: many images through the REST service into a JSONL file of results keyed by id; resumable.

Input is a folder (its images, recursively), a glob, or a JSONL manifest with one object a line:
`{"id": "cat-1", "image": "imgs/cat.png", "task": "caption", "box": [x0, y0, x1, y1]}`, with optional
`task` ("caption" or "localize"), `box` or `point` ([x, y]) for a caption, and `text` (a string or a list,
implies "localize"). Coordinates are pixels of the image. Relative image paths are read from the manifest's
folder, and no image outside the root (that folder unless told another) is read, symlinks resolved,
unless `allow_outside_root`. Ids are letters, digits, '.', '_' and '-' (no leading '.'), so they are safe as
file names; a folder's or glob's file paths are sanitized into such ids.

Each result is one line `{"id", "task", "image", "result"}` of the output (with `text`, the texts asked, for
"localize"), `result` being the service's answer; each failure one line
`{"id", "image", "status", "attempts", "error": {"code", "message"}}` of the errors file, which holds the last
run's failures. A rerun skips the ids already in the output and cuts off a torn last line left by a killed run,
so every id is written once; it refuses to run if the output holds another task's (or text's) results for its
ids. A service that stops answering midway stops the run.
"""

from __future__ import annotations

import asyncio
import email.utils
import glob
import json
import logging
import math
import mimetypes
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import takewhile
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
TASKS = ("caption", "localize")
MANIFEST_FIELDS = ("id", "image", "task", "box", "point", "text")
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0
# A 429 with Retry-After (the service's rate limit or full queue pacing the client) is waited out without using
# up a retry, for at most this long per request: a rate limit slows a batch down, it does not fail its items.
MAX_THROTTLED_S = 600.0


class BatchError(Exception):
    """The batch cannot run at all (input missing, output not ours, service unreachable): a message for the user."""


class ItemError(Exception):
    """One input entry is refused; `code` goes to its error record."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Item:
    """One request: `path` is the resolved image file, `image` the path as the input gave it."""

    id: str
    path: Path
    image: str
    task: str = "caption"
    box: tuple[float, ...] | None = None
    point: tuple[float, ...] | None = None
    texts: tuple[str, ...] = ()

    def fields(self) -> dict[str, str | list[str]]:
        """The multipart text fields of the request."""
        if self.task == "localize":
            return {"text": list(self.texts)}
        if self.box is not None:
            return {"box": ",".join(map(str, self.box))}
        if self.point is not None:
            return {"point": ",".join(map(str, self.point))}
        return {}


API_KEY = re.compile(r"[\x21-\x7e]+")  # what a header can carry after 'Bearer ' (the web page asks for the same)


@dataclass(frozen=True)
class Options:
    """How to talk to the service. `retries` are extra attempts on 429/502/503/504 (but not 503 `load_failed`) and
    connection errors."""

    server: str = "http://127.0.0.1:8000"
    concurrency: int = 8
    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    progress: bool = True
    api_key: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer` when the service has keys

    def __post_init__(self) -> None:
        if not self.server.startswith(("http://", "https://")):
            raise BatchError(f"the server must be an http:// or https:// URL, got {self.server!r}")
        try:
            port = httpx.URL(self.server).port
        except (httpx.InvalidURL, ValueError) as e:
            raise BatchError(f"the server URL {self.server!r} is not valid: {e}") from None
        if port is not None and not 0 < port < 65536:
            raise BatchError(f"the server URL {self.server!r} is not valid: port {port} is not 1 to 65535")
        if not math.isfinite(self.timeout_s):
            raise BatchError(f"the timeout must be a number of seconds, got {self.timeout_s}")
        if self.concurrency < 1 or self.retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise BatchError("need concurrency >= 1, retries >= 0, timeout > 0 and backoff >= 0")
        if self.api_key and not API_KEY.fullmatch(self.api_key):  # "" or None is no key; the message never shows it
            raise BatchError(
                "the API key (PIXELLLM_API_KEY) has a space, a line break or a non-ASCII character, which no HTTP "
                "header carries: set it to the key alone, as `pixelllm api-key` printed it"
            )


@dataclass
class Summary:
    """What a run did: `skipped` ids were already in the output, `refused` entries were never sent."""

    total: int
    skipped: int
    succeeded: int
    failed: int
    refused: int
    retries: int
    elapsed_s: float
    output: str
    errors: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rate = (self.succeeded + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"{self.total} entries: {self.succeeded} written, {self.skipped} already done, {self.failed} failed "
            f"({self.refused} refused before sending), {self.retries} retries, {self.elapsed_s:.1f} s ({rate:.1f}/s)",
            f"results: {self.output}",
        ]
        if self.failed:
            lines.append(f"errors:  {self.errors} (rerun to retry them; done ids are skipped)")
        return "\n".join(lines)


def sanitize_id(name: str) -> str:
    """A safe file name from any string: runs of other characters than letters, digits, '.', '_', '-' become
    '_', leading dots go, at most 200 characters."""
    return re.sub(r"[^\w.\-]+", "_", name).lstrip(".")[:200] or "_"


def error_record(
    id: str | None, code: str, message: str, image: str | None = None, status: int | None = None, attempts: int = 0
) -> dict[str, Any]:
    return {
        "id": id,
        "image": image,
        "status": status,
        "attempts": attempts,
        "error": {"code": code, "message": message},
    }


# ---- input ------------------------------------------------------------------------------------------------


def discover(
    source: str, root: str | None = None, allow_outside_root: bool = False, text: str | None = None
) -> tuple[list[Item], list[dict[str, Any]]]:
    """The items to send from a folder, a glob or a JSONL manifest, and error records for refused entries.

    `root` bounds the images read (default: the folder, the glob's fixed prefix, or the manifest's folder);
    a folder's or glob's ids are the files' paths from that folder or prefix, whatever the root. Hidden files
    and folders (".name") are left out, as are files without an image suffix. `text` localizes that text in
    every image of a folder or glob instead of captioning it.
    """
    if text is not None and not text.strip():
        raise BatchError("the text is empty: give what to localize, or no text to caption")
    path = Path(source)
    if path.is_dir():
        found = _from_files(_folder_images(path), path, Path(root) if root else path, allow_outside_root, text)
    elif path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise BatchError(
                f"{source} is an image: give a folder, a quoted glob or a JSONL manifest of images "
                f"(`pixelllm caption {source}` captions one image)"
            )
        if text is not None:
            raise BatchError("a text is for a folder or a glob; in a manifest, give each entry its own 'text'")
        found = _from_manifest(path, Path(root) if root else path.parent, allow_outside_root)
    elif glob.has_magic(source):
        matches = [Path(p) for p in glob.glob(source, recursive=True)]
        if not matches:
            raise BatchError(f"nothing to send: no file matches {source}")
        fixed = Path(*takewhile(lambda part: not glob.has_magic(part), Path(source).parts))
        files = sorted(p for p in matches if _is_image(p))
        found = _from_files(files, fixed, Path(root) if root else fixed, allow_outside_root, text)
    else:
        raise BatchError(f"input not found: {source} (give a folder, a glob like 'images/*.png' or a JSONL manifest)")
    if not any(found):
        raise BatchError(f"nothing to send: {source} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or entries")
    return found


def _folder_images(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively and through symlinked folders (as a `**` glob goes; a link
    back to a folder it is in is not followed again), hidden files and folders left out; sorted."""
    files = []
    ancestors = {os.fspath(folder): frozenset[str]()}  # each folder to visit -> the real paths above it
    for here, folders, names in os.walk(folder, followlinks=True):
        above = ancestors.pop(here) | {os.path.realpath(here)}
        kept = []
        for name in sorted(folders):
            child = os.path.join(here, name)
            if not name.startswith(".") and os.path.realpath(child) not in above:
                ancestors[child] = above
                kept.append(name)
        folders[:] = kept
        files += [Path(here, name) for name in names if not name.startswith(".") and _is_image(Path(here, name))]
    return sorted(files)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _from_files(
    files: list[Path], base: Path, root: Path, allow_outside_root: bool, text: str | None
) -> tuple[list[Item], list[dict[str, Any]]]:
    """Items for `files`, each with its path from `base` as its id; files outside `root` are refused."""
    items, refused, seen = [], [], set()
    for file in files:
        id = sanitize_id(os.path.relpath(file, base))
        try:
            if id in seen:
                raise ItemError("duplicate_id", f"{file} has the id {id!r} of an earlier file")
            resolved = _resolve(str(file), Path(), root, allow_outside_root)
        except ItemError as e:
            refused.append(error_record(id, e.code, e.message, str(file)))
            continue
        seen.add(id)
        task, texts = ("localize", (text,)) if text is not None else ("caption", ())
        items.append(Item(id, resolved, str(file), task, texts=texts))
    return items, refused


def _from_manifest(path: Path, root: Path, allow_outside_root: bool) -> tuple[list[Item], list[dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark from a Windows editor
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read the manifest {path}: {e}") from None
    items, refused, seen = [], [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        entry: Any = None
        try:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ItemError("invalid_json", f"not JSON: {e}") from None
            item = parse_entry(entry, path.parent, root, allow_outside_root)
            if item.id in seen:
                raise ItemError("duplicate_id", f"id {item.id!r} is also on an earlier line")
        except ItemError as e:
            id, image = (entry.get("id"), entry.get("image")) if isinstance(entry, dict) else (None, None)
            record = error_record(None if id is None else str(id), e.code, f"{path} line {n}: {e.message}")
            refused.append({**record, "image": image if isinstance(image, str) else None})
            continue
        seen.add(item.id)
        items.append(item)
    return items, refused


def parse_entry(entry: Any, base: Path, root: Path, allow_outside_root: bool = False) -> Item:
    """An `Item` from one manifest object; relative image paths are read from `base`. Raises `ItemError`."""
    if not isinstance(entry, dict):
        raise ItemError("invalid_entry", "expected a JSON object")
    unknown = sorted(set(entry) - set(MANIFEST_FIELDS))
    if unknown:
        raise ItemError("invalid_entry", f"unknown fields {unknown}; the fields are {', '.join(MANIFEST_FIELDS)}")
    id = entry.get("id")
    if isinstance(id, bool) or not isinstance(id, (str, int)):
        raise ItemError("invalid_id", "id: required, a string or an integer")
    id = str(id)
    if id != sanitize_id(id):
        raise ItemError(
            "invalid_id",
            f"id {id!r} is not a safe file name: use letters, digits, '.', '_', '-', not starting with '.'",
        )
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise ItemError("invalid_entry", "image: required, a file path")
    if "://" in image:
        raise ItemError("invalid_entry", f"image: {image!r} is a URL; give a file path")
    texts = _texts(entry.get("text"))
    task = entry.get("task") or ("localize" if texts else "caption")
    if task not in TASKS:
        raise ItemError("invalid_task", f"task: {task!r} is not one of {', '.join(TASKS)}")
    box, point = _coords(entry.get("box"), 4, "box"), _coords(entry.get("point"), 2, "point")
    if task == "localize" and not texts:
        raise ItemError("invalid_entry", "text: required to localize")
    if task == "localize" and (box or point):
        raise ItemError("invalid_entry", "box, point: only for a caption; localize takes a text")
    if task == "caption" and texts:
        raise ItemError("invalid_entry", "text: only to localize; a caption takes a box or a point")
    if box and point:
        raise ItemError("invalid_entry", "give a box or a point, not both")
    return Item(id, _resolve(image, base, root, allow_outside_root), image, task, box, point, texts)


def _texts(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ItemError("invalid_entry", "text: a non-empty string or a list of them")
    return tuple(values)


def _coords(value: Any, n: int, name: str) -> tuple[float, ...] | None:
    """`n` finite numbers, or None; the service checks the rest (order, sign) and names the field if wrong."""
    if value is None:
        return None
    keys = "[x0, y0, x1, y1]" if n == 4 else "[x, y]"
    if not isinstance(value, list) or len(value) != n:
        raise ItemError("invalid_coordinates", f"{name}: expected {keys} in image pixels, got {value!r}")
    if not all(_finite(v) for v in value):
        raise ItemError("invalid_coordinates", f"{name}: expected {n} finite numbers {keys}, got {value!r}")
    return tuple(float(v) for v in value)


def _finite(value: Any) -> bool:
    """A JSON number that is a finite float (an integer of hundreds of digits is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _resolve(image: str, base: Path, root: Path, allow_outside_root: bool) -> Path:
    """`base / image` with symlinks resolved; refused outside `root` unless allowed, or if it is not a file."""
    path = (base / image).resolve()
    if not allow_outside_root and not path.is_relative_to(root.resolve()):
        raise ItemError(
            "outside_root",
            f"image {image!r} is {path}, outside the root {root.resolve()}; "
            "pass --root to widen it, or --allow-outside-root",
        )
    if not path.is_file():
        raise ItemError("image_not_found", f"image not found: {image}")
    return path


# ---- output -----------------------------------------------------------------------------------------------


class JsonlWriter:
    """Appends (or, with `truncate`, rewrites) a JSONL file; each record is one `write` then `fsync`, so a killed
    run leaves at most a torn last line, which `recover` cuts off."""

    def __init__(self, path: Path, truncate: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
        self.path = path
        self.fd = os.open(path, flags, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        # a file name that is not UTF-8 (os.fsdecode's lone surrogates) is written as JSON's \udcXX escapes,
        # which json.loads reads back into the same name
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
            os.fsync(self.fd)
        except OSError as e:  # os.write and os.fsync name no file
            e.filename = str(self.path)
            raise

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RESULT_KEYS = ("id", "task", "image", "result")
ERROR_KEYS = ("id", "error")
RECORD_START = b'{"id": '  # how `JsonlWriter` starts every record, so a torn last line starts so too


Request = tuple[str, tuple[str, ...]]  # what was asked of an id: the task and the texts localized


def _scan(path: Path, keys: tuple[str, ...], kind: str) -> tuple[dict[str, Request], int]:
    """The ids in a JSONL file of `kind` ("a results", "an errors") records, objects with `keys`, that this
    client wrote, each with its `Request` (a results record's), and the length of its records: a last line cut
    short by a killed run (a record's start that is no JSON) is left out. Raises `BatchError`, and leaves the
    file as it is, if it holds anything else."""
    done, end = {}, 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as e:
                    last = not line.endswith(b"\n")
                    if last and (line.startswith(RECORD_START) or RECORD_START.startswith(line)):
                        break
                    if isinstance(e, UnicodeDecodeError):
                        raise BatchError(
                            f"{path} is not {kind} file: it is not UTF-8 text (an image?); give another file: this "
                            "one is left as it is"
                        ) from None
                    record, problem = None, f"{type(e).__name__}: {e}"
                else:
                    problem = _missing(record, keys)
                if problem:
                    raise BatchError(
                        f"{path} line {n} is not {kind} record ({problem}); remove that line, or give another "
                        "file: this one is left as it is"
                    )
                done[str(record["id"])] = _request(record)
            end += len(line)
    return done, end


def _request(record: dict[str, Any]) -> Request:
    """The task of a results record and the texts it asked to localize (none for an errors record); a record
    without `text` (an older client's) has them from its answer, as the service cleaned them."""
    texts = record.get("text")
    if not isinstance(texts, list):
        answer = record.get("result")
        results = answer.get("results") if isinstance(answer, dict) else None
        texts = [r.get("text") for r in results if isinstance(r, dict)] if isinstance(results, list) else []
    return str(record.get("task")), tuple(str(t) for t in texts)


def _missing(record: Any, keys: tuple[str, ...]) -> str:
    """What keeps `record` from being an object with `keys` ("" if nothing)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [key for key in keys if key not in record]
    return f"no {', '.join(missing)}" if missing else ""


def recover(path: Path) -> dict[str, Request]:
    """The ids already in an output JSONL, each with what was asked of it, after cutting off a torn last line
    (and ending a last record that lacks its newline with one). Raises `BatchError` for a file that is not
    such an output (a manifest, an image, notes given by mistake)."""
    if not path.exists():
        return {}
    done, end = _scan(path, RESULT_KEYS, "a results")
    size = path.stat().st_size
    if end < size:
        logger.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted run", path, size - end)
        os.truncate(path, end)
    if end:
        with open(path, "rb+") as f:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return done


def check_same_requests(items: list[Item], done: dict[str, Request], output: Path) -> None:
    """Raise `BatchError` if `output` holds results of another task or text under ids of `items`: skipping
    those ids, as a rerun does, would leave what is asked now undone."""
    clashes = [item for item in items if item.id in done and done[item.id] != (item.task, item.texts)]
    if clashes:
        item = clashes[0]
        raise BatchError(
            f"{output} already holds other results for {len(clashes)} of these ids, such as {item.id!r} "
            f"({_describe(done[item.id])}; asked now: {_describe((item.task, item.texts))}); write them to "
            "another file with -o, or remove those lines to redo them"
        )


def _describe(request: Request) -> str:
    task, texts = request
    return f"{task} {', '.join(map(repr, texts))}" if texts else task


def check_errors_file(path: Path) -> None:
    """Raise `BatchError` unless `path`, which a run rewrites, is absent, empty or an errors JSONL of this client."""
    if path.exists() and path.stat().st_size:
        _scan(path, ERROR_KEYS, "an errors")


# ---- requests ---------------------------------------------------------------------------------------------


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_delay(attempt: int, retry_after: float | None, options: Options, rng: random.Random) -> float:
    """Seconds before retry `attempt` (0-based): exponential backoff with jitter (half to all of it), and at
    least the server's `Retry-After` (jittered up to 20% later, capped at MAX_RETRY_AFTER_S)."""
    backoff = min(options.max_backoff_s, options.backoff_s * 2**attempt)
    delay = rng.uniform(backoff / 2, backoff)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S) * rng.uniform(1.0, 1.2))
    return delay


class _Session:
    """The shared httpx client with the retry policy; counts the retries."""

    def __init__(self, client: httpx.AsyncClient, options: Options, rng: random.Random) -> None:
        self.client, self.options, self.rng, self.retries = client, options, rng, 0

    async def request(self, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, int]:
        """The response and the attempts made; the last response (or TransportError) when retries run out. A 429
        with Retry-After uses up no retry (`MAX_THROTTLED_S`)."""
        attempt, attempts, throttled_s = 0, 0, 0.0
        while True:
            last = attempt == self.options.retries
            attempts += 1
            try:
                response = await self.client.request(method, url, **kwargs)
            except httpx.TransportError as e:
                if last:
                    raise
                throttled, wait = False, retry_delay(attempt, None, self.options, self.rng)
                logger.info("%s %s: %s; retrying in %.2f s", method, url, type(e).__name__, wait)
            else:
                retry_after = retry_after_s(response.headers.get("retry-after"))
                throttled = response.status_code == 429 and retry_after is not None and throttled_s < MAX_THROTTLED_S
                if (
                    response.status_code not in RETRY_STATUSES
                    or (last and not throttled)
                    or _error(response)[0] == "load_failed"  # a model that failed to load will not load on a retry
                ):
                    return response, attempts
                wait = retry_delay(0 if throttled else attempt, retry_after, self.options, self.rng)
                logger.info("%s %s: %d; retrying in %.2f s", method, url, response.status_code, wait)
            if throttled:
                throttled_s += wait
            else:
                attempt += 1
            self.retries += 1
            await asyncio.sleep(wait)

    async def send(self, item: Item) -> tuple[bool, dict[str, Any]]:
        """(True, result record) or (False, error record) for one item."""
        try:
            data = await asyncio.to_thread(item.path.read_bytes)
        except OSError as e:
            return False, error_record(item.id, "unreadable_image", f"cannot read {item.image}: {e}", item.image)
        mime = mimetypes.guess_type(item.path.name)[0] or "application/octet-stream"
        try:
            response, attempts = await self.request(
                "POST", f"/v1/{item.task}", files={"image": (_sendable(item.path.name), data, mime)}, data=item.fields()
            )
        except httpx.TransportError as e:
            attempts = self.options.retries + 1
            message = f"{type(e).__name__}: {e} (after {attempts} attempts)"
            return False, error_record(item.id, "connection_error", message, item.image, None, attempts)
        if response.status_code in (401, 403):  # every other item would fail the same way
            code, message = _error(response)
            hint = "set PIXELLLM_API_KEY" if response.status_code == 401 else "check PIXELLLM_API_KEY"
            raise BatchError(f"the service refused the request ({code}: {message}); {hint}")
        if response.status_code == 200:
            try:
                asked = {"text": list(item.texts)} if item.task == "localize" else {}
                return True, {"id": item.id, "task": item.task, "image": item.image, **asked, "result": response.json()}
            except ValueError:  # not the service's JSON (a proxy's page?): an error record with the body
                pass
        return False, error_record(item.id, *_error(response), item.image, response.status_code, attempts)

    async def serving(self) -> bool:
        """Whether the service is there: one `GET /readyz` connects and, if it answers, answers 200 (a slow
        answer, or none in time, is a busy service, not a gone one; a proxy's 502 is a gone one)."""
        try:
            response = await self.client.get("/readyz")
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return False
        except httpx.TransportError:
            return True  # connected: busy
        return response.status_code == 200


def _sendable(name: str) -> str:
    """A file name a multipart header can carry: bytes that are not UTF-8 (os.fsdecode's surrogates) as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _error(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of the service's `{"error": {"code", "message"}}`, or made from the status and body."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}", response.text[:500]


def _maybe_gone(record: dict[str, Any]) -> bool:
    """Whether an item's failure may mean the service is gone: no connection, or a 502/503/504 (from a proxy in
    front of it, say) that its retries did not get past."""
    return record["error"]["code"] == "connection_error" or record["status"] in (502, 503, 504)


async def _check_ready(session: _Session) -> None:
    """Wait (with the retry policy) for `/readyz`; raise `BatchError` if the service cannot serve."""
    try:
        response, _ = await session.request("GET", "/readyz")
    except httpx.TransportError as e:
        raise BatchError(
            f"cannot reach the service at {session.options.server}: {type(e).__name__}: {e}; "
            "start it with `pixelllm serve`, or pass --server"
        ) from None
    if response.status_code != 200:
        code, message = _error(response)
        raise BatchError(f"the service at {session.options.server} is not ready: {code}: {message}")


# ---- the run ----------------------------------------------------------------------------------------------


def run_batch(
    items: list[Item], refused: list[dict[str, Any]], output: Path, errors: Path, options: Options = Options()
) -> Summary:
    """Send every item whose id is not already in `output`; results to `output`, failures to `errors`."""
    if output.resolve() == errors.resolve():
        raise BatchError(f"the output and the errors file are both {output}; give two files")
    try:
        return asyncio.run(_run(items, refused, output, errors, options))
    except OSError as e:  # reading an image is an item's error; this is the output or errors file
        raise BatchError(f"cannot write {e.filename}: {e.strerror}") from None


async def _run(
    items: list[Item], refused: list[dict[str, Any]], output: Path, errors: Path, options: Options
) -> Summary:
    start = time.perf_counter()
    check_errors_file(errors)
    done = recover(output)
    check_same_requests(items, done, output)
    todo = [item for item in items if item.id not in done]
    # a refused entry whose id is done has nothing to do, unless it was refused for that id: it is another image
    unsent = [r for r in refused if r["id"] not in done or r["error"]["code"] == "duplicate_id"]
    succeeded, failed = 0, len(unsent)
    limits = httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency)
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    client = httpx.AsyncClient(base_url=options.server, timeout=options.timeout_s, limits=limits, headers=headers)
    async with client:
        session = _Session(client, options, random.Random())
        if todo:  # before any file is written: a batch that cannot run leaves none
            await _check_ready(session)
        with JsonlWriter(output) as out, JsonlWriter(errors, truncate=True) as err:
            for record in unsent:
                err.write(record)
            pending: Iterator[Item] = iter(todo)
            with tqdm(total=len(todo), unit="img", desc="batch", disable=not options.progress) as bar:
                bar.set_postfix(failed=failed, retries=0, refresh=False)

                async def worker() -> None:
                    nonlocal succeeded, failed, gone
                    for item in pending:  # one shared iterator: every item is taken by one worker
                        ok, record = await session.send(item)
                        (out if ok else err).write(record)
                        succeeded, failed = succeeded + ok, failed + (not ok)
                        bar.update()
                        bar.set_postfix(failed=failed, retries=session.retries, refresh=False)
                        if not ok and _maybe_gone(record) and not await session.serving():
                            gone = gone or f"{record['error']['code']}: {record['error']['message'][:200]}"
                        if gone:  # every item left would spend its retries on a service that is not there
                            return

                gone = ""
                workers = [asyncio.create_task(worker()) for _ in range(min(options.concurrency, len(todo)))]
                try:
                    await asyncio.gather(*workers)
                finally:  # one raised (a 401, say): the others write nothing more to files about to close
                    for task in workers:
                        task.cancel()
        retries = session.retries
    if gone:
        raise BatchError(
            f"the service at {options.server} stopped answering ({gone}); {succeeded} results written, "
            f"{len(todo) - succeeded} ids left: rerun the same command when it is back, done ids are skipped"
        )
    return Summary(
        total=len(items) + len(refused),
        skipped=len(items) - len(todo) + len(refused) - len(unsent),
        succeeded=succeeded,
        failed=failed,
        refused=len(unsent),
        retries=retries,
        elapsed_s=time.perf_counter() - start,
        output=str(output),
        errors=str(errors),
    )


def default_errors_path(output: Path) -> Path:
    """`results.jsonl` -> `results.errors.jsonl`."""
    return output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")
