"""Service settings, read from `PIXELLLM_*` environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from pixelllm.config import DEFAULT_WEIGHTS

from .errors import StartupError


class Settings(BaseSettings):
    """Everything the service can be told; each field is `PIXELLLM_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="PIXELLLM_", protected_namespaces=(), allow_inf_nan=False)

    model: str | None = Field(
        None, description="Model directory or preset name; default: the checkout's weights/pixelllm-tiny"
    )
    sam_checkpoint: str | None = None
    eva_checkpoint: str | None = None
    t5_path: str | None = None
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="'int8': the language model's linear layers in int8 (CPU and float32 only; device 'auto' is then "
        "the CPU), for faster decoding "
        "where the language model is large (pixelllm-base and up; slower on the tiny default); answers may differ "
        "slightly",
    )
    keep_freed_memory: bool = Field(
        True,
        description="Reuse freed memory instead of returning it to the kernel (glibc malloc, pixelllm/memory.py): "
        "no page faults on the large tensors of many-prompt calls, threads sharing 2 malloc arenas; the resident size "
        "stays near its peak",
    )

    max_batch_size: int = Field(8, ge=1, le=256)
    max_batch_wait_ms: float = Field(5.0, ge=0)
    max_queue: int = Field(
        64, ge=1, description="Requests admitted at once (decoding their image, queued or running) before 429"
    )
    cache_entries: int = Field(64, ge=0)
    cache_bytes: int = Field(1 << 30, ge=0)

    max_body_bytes: int = Field(20 << 20, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1, description="Also capped by Pillow's MAX_IMAGE_PIXELS")
    max_image_aspect: float = Field(100.0, ge=1, description="Longest side / shortest side")
    max_text_chars: int = Field(256, ge=1)
    max_texts: int = Field(16, ge=1)
    max_regions: int = Field(32, ge=1)
    request_timeout_s: float = Field(60.0, gt=0, description="Seconds from the body's arrival to the answer, else 504")
    body_timeout_s: float = Field(
        120.0, gt=0, description="The whole request body must arrive within this many seconds (408), however slowly"
    )
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="Idle keep-alive connections close after this long; keep it above your clients' and proxies'",
    )

    # access control (server/security.py); API keys are on when a keys file or a hash is given
    api_keys_file: Path | None = Field(
        None, description="File of API key SHA-256 hashes, one a line (`pixelllm api-key`); re-read on change"
    )
    api_key_hashes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More API key SHA-256 hashes, comma-separated"
    )
    protect_metrics: bool = Field(True, description="With API keys on, /metrics needs a key")
    protect_docs: bool = Field(False, description="With API keys on, /docs and /openapi.json need a key")
    rate_limit_per_minute: float = Field(
        0.0, ge=0, description="Requests a minute per API key (per client address without keys); 0: no limit"
    )
    rate_limit_burst: int = Field(10, ge=1, description="Requests a key may make at once before the rate applies")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser, comma-separated"
    )

    debug_load_delay_ms: float = Field(0.0, ge=0, description="Test only: wait this long before loading the model")
    debug_batch_delay_ms: float = Field(0.0, ge=0, description="Test only: sleep this long in every batch")
    debug_decode_delay_ms: float = Field(0.0, ge=0, description="Test only: sleep this long after decoding an image")
    debug_fail_model_every: int = Field(0, ge=0, description="Test only: every Nth model call raises; 0: never")
    debug_fail_rate: float = Field(
        0.0, ge=0, le=1, description="Test only: answer this random fraction of /v1 requests with a retryable error"
    )
    debug_fail_statuses: list[int] = Field([429, 503], description="Test only: the statuses debug_fail_rate answers")

    # `pixelllm serve --ray` (server/ray_app.py); a Serve config YAML can override each per deployment
    ray_replicas: int = Field(1, ge=1, description="Ray Serve: model replicas (unless ray_max_replicas autoscales)")
    ray_min_replicas: int = Field(1, ge=0, description="Ray Serve: autoscaling lower bound")
    ray_max_replicas: int | None = Field(None, ge=1, description="Ray Serve: autoscale up to this many replicas")
    ray_num_cpus: float = Field(1.0, ge=0, description="Ray Serve: CPUs reserved per replica")
    ray_num_gpus: float = Field(0.0, ge=0, description="Ray Serve: GPUs per replica (0.5: two replicas per GPU)")
    ray_max_ongoing_requests: int = Field(32, ge=1, description="Ray Serve: requests one replica holds at once")
    ray_max_queued_requests: int = Field(
        64, ge=-1, description="Ray Serve: requests waiting at each proxy before 429 (-1: no limit)"
    )

    @field_validator("api_key_hashes", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("api_key_hashes")
    @classmethod
    def _sha256_hex(cls, hashes: list[str]) -> list[str]:
        from .security import parse_hashes

        return sorted(parse_hashes(hashes, "entry"))

    @field_validator("debug_fail_statuses")
    @classmethod
    def _error_statuses(cls, statuses: list[int]) -> list[int]:
        if not all(400 <= s <= 599 for s in statuses):
            raise ValueError(f"give HTTP error statuses (400 to 599), got {statuses}")
        return statuses

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():  # not ".": `=$KEYS` with KEYS unset is a mistake to say
            raise ValueError(
                "is empty: give the keys file (`pixelllm api-key --keys-file FILE` makes one), or unset it"
            )
        return value

    @model_validator(mode="after")
    def _int8_on_cpu_in_float32(self) -> Settings:
        if self.quantize == "int8" and (self.dtype != "float32" or self.device not in ("cpu", "auto")):
            raise ValueError(
                "PIXELLLM_QUANTIZE=int8 is for float32 models on the CPU: set PIXELLLM_DTYPE=float32 and "
                "PIXELLLM_DEVICE=cpu (on a GPU, use PIXELLLM_DTYPE=bfloat16 instead of int8)"
            )
        return self

    @model_validator(mode="after")
    def _replica_bounds(self) -> Settings:
        if self.ray_max_replicas is not None and self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError(
                f"PIXELLLM_RAY_MIN_REPLICAS ({self.ray_min_replicas}) is above PIXELLLM_RAY_MAX_REPLICAS "
                f"({self.ray_max_replicas})"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.api_keys_file is not None or bool(self.api_key_hashes)

    def resolved_model(self) -> str:
        """The model to load: the setting, else the embedded default weights; ValueError without either (an install
        from a wheel holds no weights: it served the random tiny preset, with only a warning in the log)."""
        if self.model:
            return self.model
        if DEFAULT_WEIGHTS.is_dir():
            return str(DEFAULT_WEIGHTS)
        raise ValueError(
            f"PIXELLLM_MODEL is unset and the default model is not at {DEFAULT_WEIGHTS} (a package installed from a "
            "wheel holds no weights): set PIXELLLM_MODEL to a model directory, such as weights/pixelllm-tiny in a "
            "checkout of the repository"
        )


def read_settings() -> Settings:
    """`Settings()` from the environment; `StartupError` naming each bad `PIXELLLM_*` variable and why."""
    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(_problem(err["loc"], err["msg"].removeprefix("Value error, ")) for err in e.errors())
        raise StartupError(f"bad settings: {problems}") from None
    except SettingsError as e:  # a list setting that is not JSON: 'error parsing value for field "name" ...'
        field = re.search(r'field "(\w+)"', str(e))
        name = f"PIXELLLM_{field.group(1).upper()}" if field else "a PIXELLLM_* list setting"
        raise StartupError(f"bad settings: {name} is not a JSON list, e.g. [429, 503]") from None


def _problem(loc: tuple[str | int, ...], message: str) -> str:
    """One validation error as the user set it: the variable (and the list item) and what is wrong."""
    if not loc:
        return message
    item = f" (item {loc[1]})" if len(loc) > 1 else ""
    return f"PIXELLLM_{str(loc[0]).upper()}{item}: {message}"
