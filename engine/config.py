"""Engine configuration: what model and drafter to serve, how, and within which limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # the id it is served and advertised under
METHODS = ("ar", "ngram", "dspark", "dflash", "eagle3")
WITHOUT_MODEL_DRAFTER = ("ar", "ngram")   # nothing for prompt lookup to go in front of
# Prompt lookup's minimum match for method auto and the bench's -lookup methods (docs/benchmarks.md,
# "Prompt lookup ahead of the drafter").
LOOKUP_MIN_MATCH = 2


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(EMBEDDED_MODEL, description="embedded model name, a local HF checkpoint dir, or an HF id")
    method: Literal["auto", "ar", "ngram", "dspark", "dflash", "eagle3"] = Field("auto", description=(
        "auto = dspark with `drafter`, or with the drafter shipped for the model, served through "
        "Algorithm 1 (scheduler sync unless set) with prompt lookup ahead of it (lookup_min_match 2 "
        "unless set); plain decoding (ar) for a model without a drafter"))
    drafter: str | None = Field(None, description="DeepSpec-format drafter directory")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    block_size: int = Field(7, ge=1, le=32, description="draft tokens per round (gamma)")
    confidence_threshold: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "dspark: verify a proposal only up to the first position whose confidence is below this (0 = off)"))
    scheduler: Literal["static", "sync", "async"] = Field("static", description=(
        "how many draft tokens each request verifies: static = all proposed (or up to the confidence "
        "threshold), sync = Algorithm 1 over SPS(R, W), async = the §5.2 top-K variant"))
    token_budget: int | None = Field(None, ge=1, description=(
        "most query tokens one verification forward may hold (default max_batch * (block_size + 1))"))
    ngram_max: int = Field(3, ge=1, le=8, description="longest n-gram the prompt-lookup drafter matches")
    lookup_min_match: int = Field(0, ge=0, le=8, description=(
        "dspark, dflash, eagle3: where a request's last n >= this many tokens (up to ngram_max) occurred "
        "before in it, propose what followed them (prompt lookup) instead of a model draft; 0 = off"))
    lookup_corpus_tokens: int = Field(262_144, ge=0, le=1 << 26, description=(
        "with lookup_min_match: where a request's own text holds no match, look in the text of other "
        "requests of its scope (the node's: same client), keeping up to this many tokens of finished "
        "requests (~75 bytes each); 0 = each request's own text only"))
    max_batch: int = Field(8, ge=1, le=1024, description="requests decoded together")
    max_context: int = Field(4096, ge=16, description="prompt + new tokens per request")
    max_queue: int = Field(256, ge=0, description=(
        "requests waiting for a slot (all max_batch taken) before new ones are refused; 0: serve only "
        "while a slot is free"))
    prefill_chunk: int = Field(512, ge=16, description=(
        "most prompt tokens prefilled per step, over all new requests: a longer prompt is spread over "
        "steps and the running requests decode in between"))
    # Generous: a round is milliseconds to seconds, a 512-token prefill chunk of a large model on a
    # CPU under a minute; only a device that stopped answering takes minutes.
    stall_timeout_s: float = Field(300.0, ge=0.0, description=(
        "a round (one target forward and its drafts) running longer than this means the device or its "
        "driver hangs: the node fails its requests and stops, for its supervisor to restart it; 0 = off"))
    # At most 1024, as max_batch: more than any machine here has cores, while a mistyped 100000 made
    # torch claim so many threads that the process could start no more (a traceback at load).
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads (default: all cores)")
    allow_download: bool = Field(False, description="let an HF id be fetched from the hub when not cached")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.token_budget is not None and self.token_budget < self.max_batch:
            raise ValueError(f"token_budget ({self.token_budget}) must hold at least one token per "
                             f"request (max_batch {self.max_batch})")
        if self.lookup_min_match and self.method in WITHOUT_MODEL_DRAFTER:
            raise ValueError(f"lookup_min_match goes in front of a model drafter; method {self.method!r} has none")
        if self.lookup_min_match > self.ngram_max:
            raise ValueError(f"lookup_min_match ({self.lookup_min_match}) cannot exceed ngram_max ({self.ngram_max})")
        if self.method in ("dflash", "eagle3") and not self.drafter:
            raise ValueError(f"method {self.method!r} needs a drafter directory (--drafter)")
        return self

    @property
    def verify_budget(self) -> int:
        return self.token_budget or self.max_batch * (self.block_size + 1)
