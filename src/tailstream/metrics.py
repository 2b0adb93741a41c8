"""Every Prometheus metric tailstream exports, in one place.

Created against a registry passed in, so tests stay isolated. Labels are fixed
and low-cardinality: never a user or item id. docs/metrics.md lists them all.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tailstream.contract import CLASSES, TIERS

# Event → Redis latency is tens of ms on a laptop, seconds when something backs up;
# finer around the 250 ms budget, so a p99 near it reads true.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Metrics:
    """The worker's metrics. One instance per process (per registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._ingest(r)
        self._publishing(r)
        self._outages(r)
        self._flow(r)
        self._imbalance(r)
        self._scoring(r)
        self._online(r)
        self.rss = process_rss_gauge(r)

    def _ingest(self, r: CollectorRegistry) -> None:
        """Events and messages read, applied, skipped or dead-lettered."""
        self.events_in = Counter(
            "tailstream_events_in_total",
            "Events read from the input topics, valid or not (each value of a batched "
            "envelope counts; an unreadable message counts one), by topic kind.",
            ["kind"], registry=r)
        self.messages_in = Counter(
            "tailstream_messages_in_total",
            "Kafka messages read from the input topics (an envelope is one), by topic kind.",
            ["kind"], registry=r)
        self.events_processed = Counter(
            "tailstream_events_processed_total",
            "Valid, de-duplicated events applied to the state, by event class.",
            ["kind"], registry=r)
        self.dlq = Counter(
            "tailstream_dlq_total",
            "Messages sent to the dead-letter topic, by reason code.",
            ["reason"], registry=r)
        self.duplicates = Counter(
            "tailstream_duplicates_total",
            "Events skipped because their event_id was already processed.", registry=r)
        self.replays_skipped = Counter(
            "tailstream_replayed_messages_total",
            "Messages re-read after a crash or rebalance whose effects the recovered state "
            "already held (at or below the counts' offset watermark).", registry=r)
        self.items_in = Counter(
            "tailstream_catalogue_updates_total",
            "Catalogue records applied from the items topic.", registry=r)
        self.items_deleted = Counter(
            "tailstream_catalogue_deletions_total",
            "Catalogue tombstones (null values on the items topic) applied: the item left "
            "the catalogue, the index and future lists.", registry=r)
        self.dlq_failures = Counter(
            "tailstream_dlq_failures_total",
            "Refused messages whose dead-letter record could not be written even bare "
            "(the broker refused it): logged with their source offset.", registry=r)
        self.changelog_unconfirmed = Counter(
            "tailstream_changelog_unconfirmed_total",
            "Changelog records (state writes) a commit went ahead without: failed, or not "
            "confirmed within 10 s. A crash before they land loses those effects.",
            registry=r)
        self.audit_failures = Counter(
            "tailstream_audit_failures_total",
            "Audit records (processed event ids) that could not be published.", registry=r)
        self.catalogue_size = Gauge(
            "tailstream_catalogue_items",
            "Items known to this worker (catalogue records plus items seen in events).",
            registry=r)

    def _publishing(self, r: CollectorRegistry) -> None:
        """Lists written to Redis and the recommendations topic."""
        self.recs_published = Counter(
            "tailstream_recommendations_published_total",
            "Recommendation lists published, by sink (kafka, redis) and trigger.",
            ["sink", "trigger"], registry=r)
        self.publish_pending = Gauge(
            "tailstream_publish_pending_lists",
            "Lists waiting to be written (Redis unavailable or slow), newest per user.",
            registry=r)
        self.publish_dropped = Counter(
            "tailstream_publish_dropped_total",
            "Waiting lists dropped because the pending queue was full (oldest first).",
            registry=r)

    def _outages(self, r: CollectorRegistry) -> None:
        """Redis outages, broker resets and stuck partitions: how the worker copes."""
        self.redis_up = Gauge(
            "tailstream_redis_up",
            "1 if the last Redis write of lists succeeded, 0 while writes fail.", registry=r)
        self.redis_errors = Counter(
            "tailstream_redis_errors_total",
            "Failed Redis operations (each opens the circuit for a backoff), by component: "
            "lists, dedupe, buffer.", ["component"], registry=r)
        self.redis_circuit_open = Gauge(
            "tailstream_redis_circuit_open",
            "1 while Redis is treated as unavailable (operations skipped or queued until "
            "the next retry), else 0.", registry=r)
        self.broker_resets = Counter(
            "tailstream_broker_resets_total",
            "Times the broker came back without its log (changelogs gone, or other "
            "records at offsets read before: a memory-storage broker restarted): offset "
            "watermarks reset, inputs re-read.",
            registry=r)
        self.input_rereads = Counter(
            "tailstream_input_rereads_total",
            "Input partitions sought back because their records came out of order "
            "(around a seek): the records between are read again, not skipped.",
            registry=r)
        self.behind_commit = Counter(
            "tailstream_inputs_behind_commit_total",
            "Input partitions read again from where the restored counts end because the "
            "offset committed was past it (a commit that went ahead of the counts' "
            "changelog record): those messages are counted, not skipped.", registry=r)
        self.stuck_partitions = Gauge(
            "tailstream_stuck_partitions",
            "Input partitions held by another group member whose committed offset has not "
            "moved for TAILSTREAM_STUCK_PARTITION_S while events wait.", registry=r)
        self.group_rejoins = Counter(
            "tailstream_group_rejoins_total",
            "Rebalances this worker asked for because partitions were stuck.", registry=r)
        self.redis_outages = Counter(
            "tailstream_redis_outages_total",
            "Redis outages (a run of failed operations ended by a success counts once).",
            registry=r)
        self.redis_last_outage = Gauge(
            "tailstream_redis_last_outage_seconds",
            "How long the last Redis outage that ended lasted.", registry=r)
        self.dedupe_local_only = Counter(
            "tailstream_dedupe_local_only_total",
            "Event ids de-duplicated by the local window only (Redis unavailable); they are "
            "marked in Redis once it is back (bounded).", registry=r)
        self.buffer_pending = Gauge(
            "tailstream_buffer_pending_writes",
            "Minority-buffer and loss-weight writes waiting for Redis (bounded by the "
            "buffer's capacity).", registry=r)

    def _flow(self, r: CollectorRegistry) -> None:
        """Exposure, latency, batches and consumer lag."""
        self.coverage = Gauge(
            "tailstream_catalogue_coverage_ratio",
            "Distinct items among the last 50,000 recommended slots over the items known.",
            registry=r)
        self.tail_exposure = Gauge(
            "tailstream_tail_exposure_ratio",
            "Share of the last 50,000 recommended slots that went to tail-tier items.",
            registry=r)
        self.publish_errors = Counter(
            "tailstream_publish_errors_total",
            "Failed publish attempts (retried), by sink.", ["sink"], registry=r)
        self.rec_latency = Histogram(
            "tailstream_recommendation_latency_seconds",
            "Time from an event's Kafka timestamp to its user's list being written to Redis.",
            ["trigger"], buckets=LATENCY_BUCKETS, registry=r)
        for trigger in ("event", "promotion", "ttl"):
            # Exported at zero from the first scrape: rate() needs a sample before the
            # first list, or a burst that fits one scrape interval reads as no change
            # (a quantile of NaN).
            self.rec_latency.labels(trigger)
        self.list_stage = Histogram(
            "tailstream_list_stage_seconds",
            "Where an event-triggered list's freshness went, by stage: read (Kafka "
            "timestamp → batch applied), queue (→ scoring turn began), turn (scoring), "
            "publish (Redis and Kafka writes; turn and publish once per turn).",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.loop_lag = Histogram(
            "tailstream_event_loop_lag_seconds",
            "How much later than asked a 50 ms sleep on the worker's event loop woke up "
            "(streams/worker/loop_watch.py): 0 on a loop that keeps up, a stall's length.",
            buckets=LAG_BUCKETS, registry=r)
        self.loop_stalls = Counter(
            "tailstream_event_loop_stalls",
            "Times the event loop did not run for TAILSTREAM_LOOP_STALL_MS or longer (each "
            "logged at WARNING with the stack that held it).", registry=r)
        self.batch_size = Histogram(
            "tailstream_batch_events",
            "Messages per processing batch.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "tailstream_batch_duration_seconds",
            "Time to process one batch (validate, state, score, publish).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge(
            "tailstream_consumer_lag_messages",
            "Messages in an assigned input partition not read yet (high watermark − next "
            "offset to read), by topic and partition.", ["topic", "partition"], registry=r)
        self.assigned_partitions = Gauge(
            "tailstream_assigned_partitions",
            "Input partitions assigned to this worker.", registry=r)
        self.tail_items_published = Counter(
            "tailstream_recommended_items_total",
            "Items placed in published lists, by popularity tier.", ["tier"], registry=r)

    def _imbalance(self, r: CollectorRegistry) -> None:
        """The imbalance control loop: class mix, weights, buffer, triggers, drift."""
        self.class_share = Gauge(
            "tailstream_class_share_ratio",
            "Share of each event class in the decayed counts (the mix the weights use).",
            ["event_class"], registry=r)
        self.decision_prior = Gauge(
            "tailstream_decision_prior_ratio",
            "The running class prior the served decisions are corrected to (shares of the "
            "interactions decayed over TAILSTREAM_DECISION_PRIOR_HALF_LIFE interactions; "
            "absent until TAILSTREAM_MIX_WARMUP_EVENTS were counted).",
            ["event_class"], registry=r)
        self.class_window_events = Gauge(
            "tailstream_class_window_events",
            "Events of each class in the current hopping window.", ["event_class"], registry=r)
        self.loss_weight = Gauge(
            "tailstream_loss_weight_ratio",
            "Current loss weight per class (mean 1 over the class mix), by policy.",
            ["event_class", "policy"], registry=r)
        self.buffer_samples = Gauge(
            "tailstream_buffer_samples",
            "Samples held in the minority buffer, by class (and 'tail').", ["bucket"],
            registry=r)
        self.triggers = Counter(
            "tailstream_finetune_requests_total",
            "Fine-tune requests published, by trigger reason.", ["reason"], registry=r)
        self.drift = Gauge(
            "tailstream_drift_detections",
            "ADWIN drift detections so far, by signal.", ["signal"], registry=r)
        self.item_tier_size = Gauge(
            "tailstream_item_tier_items",
            "Items per popularity tier (among tracked heavy hitters; the rest is tail).",
            ["tier"], registry=r)
        self.online_macro_f1 = Gauge(
            "tailstream_online_macro_f1_ratio",
            "Prequential macro-F1 of the river fast path.", registry=r)
        self.online_recall = Gauge(
            "tailstream_online_recall_ratio",
            "Prequential recall of the river fast path, by class.", ["event_class"], registry=r)
        self.online_purchase_auc = Gauge(
            "tailstream_online_purchase_roc_auc_ratio",
            "Prequential ROC-AUC of the river fast path's p(purchase).", registry=r)

    def _scoring(self, r: CollectorRegistry) -> None:
        """Transformer scoring: served version, index, scoring time, refreshes."""
        self.serving_version = Gauge(
            "tailstream_serving_model_version_number",
            "Model version this worker scores with (v00012 → 12; 0 = the untrained base).",
            registry=r)
        self.model_loads = Counter(
            "tailstream_model_loads_total",
            "Model versions this worker tried to load, by outcome (loaded, failed).",
            ["outcome"], registry=r)
        self.decision_refreshes = Counter(
            "tailstream_decision_refreshes_total",
            "Decision layers refitted by the trainer (at a rejected trigger) that this "
            "worker started serving with the same weights.", registry=r)
        self.index_items = Gauge(
            "tailstream_index_items",
            "Catalogue items in this worker's item-vector index.", registry=r)
        self.index_pending = Gauge(
            "tailstream_index_pending_items",
            "Catalogue items announced but not yet embedded into the index.", registry=r)
        self.index_bytes = Gauge(
            "tailstream_index_memory_bytes",
            "Memory held by the item index and the items' text vectors.", registry=r)
        self.scoring_seconds = Histogram(
            "tailstream_scoring_duration_seconds",
            "Time to score one micro-batch of users with the transformer.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.blend_updates = Counter(
            "tailstream_blend_updates_total",
            "Interactions that taught the hybrid lists' blender, by whether the item was "
            "among the candidates of the user's last list (hit) or not (miss).",
            ["outcome"], registry=r)
        self.blend_weight = Gauge(
            "tailstream_blend_weight",
            "The blender's weight of a rank-1 candidate from each source.",
            ["source"], registry=r)
        self.scoring_waiting = Gauge(
            "tailstream_scoring_waiting_users",
            "Users whose event is applied and whose new list is not computed yet.",
            registry=r)
        self.refreshed_users = Counter(
            "tailstream_refreshed_users_total",
            "Lists republished without a user event, by trigger (promotion, ttl).",
            ["trigger"], registry=r)
        self.refresh_pending = Gauge(
            "tailstream_refresh_pending_users",
            "Users still to refresh in the current bulk refresh, by trigger.",
            ["trigger"], registry=r)
        self.scoring_turn_users = Gauge(
            "tailstream_scoring_turn_users",
            "Users taken by the last scoring turn (sized so a turn fits the latency budget; "
            "doubling each turn up to TAILSTREAM_SCORING_BATCH while the queue is behind).",
            registry=r)
        self.scoring_turns = Counter(
            "tailstream_scoring_turns",
            "Transformer scoring turns, by where they ran: loop (a turn that fits the "
            "latency budget and encodes few new texts, on the event loop) or thread (a "
            "larger one, a bulk refresh's, or one with many new texts, on the torch "
            "thread; TAILSTREAM_SCORING_INLINE).", ["where"], registry=r)
        self.scoring_catchup_rest = Counter(
            "tailstream_scoring_catchup_rest_seconds",
            "Seconds the scoring task rested between turns so that the worker read a "
            "backlog first (TAILSTREAM_SCORING_CATCHUP_S, _DUTY).", registry=r)
        self.recent_latency = Gauge(
            "tailstream_recent_latency_seconds",
            "Event → Redis latency of the lists published in the last 10 s, by quantile "
            "(0.5, 0.99): what this worker publishes to Redis for the trainer's "
            "back-pressure.", ["quantile"], registry=r)
        self.model_update = Gauge(
            "tailstream_model_update_seconds",
            "The last promotion's model-update latency from its trigger (the training "
            "request): to the candidate, to the promotion, to this worker's first list "
            "carrying the new version.", ["stage"], registry=r)
        self.texts_encoded = Counter(
            "tailstream_texts_encoded_total",
            "Texts run through the encoder (cache misses), by purpose (item, query).",
            ["purpose"], registry=r)
        self.encoder_process = Gauge(
            "tailstream_encoder_process",
            "1 while a child process encodes the scoring turns' new texts and the "
            "catalogue's chunks (TAILSTREAM_ENCODER_PROCESS), 0 while the worker encodes "
            "them itself.", registry=r)
        self.encoder_process_texts = Counter(
            "tailstream_encoder_process_texts_total",
            "Texts the encoder process encoded (part of tailstream_texts_encoded_total).",
            registry=r)

    def _online(self, r: CollectorRegistry) -> None:
        """Online attribution of served lists, and the canary this worker serves."""
        self.impression_lists = Counter(
            "tailstream_impression_lists",
            "Lists served (impressions), by model version and arm (serving, canary).",
            ["model_version", "arm"], registry=r)
        self.impressions = Counter(
            "tailstream_impressions",
            "Items shown in served lists (list slots), by model version and popularity tier.",
            ["model_version", "tier"], registry=r)
        self.judged_lists = Counter(
            "tailstream_judged_lists",
            "Served lists judged by their user's next interaction within the attribution "
            "window: hit (on an item of the list) or miss, by model version. The online "
            "HitRate is hit / (hit + miss).", ["model_version", "outcome"], registry=r)
        self.attributed = Counter(
            "tailstream_attributed",
            "Interactions attributed to a served list (on one of its items within the "
            "window, or later on an item taken from it), by model version, the item's "
            "tier and the event class.", ["model_version", "tier", "class"], registry=r)
        self.attributed_positions = Counter(
            "tailstream_attributed_position",
            "Interactions attributed to a served list, by the item's position (1, 2-3, 4-7, "
            "8-15, 16+).", ["position"], registry=r)
        self.tail_target = Gauge(
            "tailstream_tail_exposure_target_ratio",
            "The tail-exposure SLO: the share of list slots that should go to tail-tier "
            "items (TAILSTREAM_TAIL_EXPOSURE_TARGET).", registry=r)
        self.canary_share = Gauge(
            "tailstream_canary_share_ratio",
            "Share of users this worker serves the canary candidate to (0: no canary).",
            registry=r)
        self.canary_version = Gauge(
            "tailstream_canary_model_version_number",
            "The candidate this worker serves to canary users (v00012 → 12; 0: none).",
            registry=r)

    def observe_imbalance(self, loop: Any) -> None:
        """Copy the imbalance loop's state into the gauges (once per batch)."""
        snap_weights = loop.weights
        policy = loop.policy.name
        decayed = loop.decayed_counts()
        total = sum(decayed.values()) or 1.0
        for c, n in decayed.items():
            self.class_share.labels(c).set(n / total)
        prior = loop.live_prior()
        if prior is not None:
            for c, share in zip(CLASSES, prior, strict=True):
                self.decision_prior.labels(c).set(float(share))
        for c, n in loop.window_counts().items():
            self.class_window_events.labels(c).set(n)
        for c, w in snap_weights.items():
            self.loss_weight.labels(c, policy).set(w)
        for bucket, n in loop.buffer.sizes().items():
            self.buffer_samples.labels(bucket).set(n)
        for signal, n in loop.drift.detections.items():
            self.drift.labels(signal).set(n)
        sizes = dict.fromkeys(TIERS, 0)
        for tier in loop.tiers.values():  # the loop's snapshot: no new sort of the items
            sizes[tier] = sizes.get(tier, 0) + 1
        for tier, n in sizes.items():
            self.item_tier_size.labels(tier).set(n)
        report = loop.online.report()
        self.online_macro_f1.set(report["macro_f1"])
        for c, v in report["recall"].items():
            self.online_recall.labels(c).set(v)
        self.online_purchase_auc.set(float(report["purchase_roc_auc"]))


def _rss_bytes() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            pages = int(fh.read().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def process_rss_gauge(registry: CollectorRegistry) -> Gauge:
    g = Gauge("tailstream_process_resident_memory_bytes",
              "Resident set size of this process.", registry=registry)
    g.set_function(_rss_bytes)
    return g


FINETUNE_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class TrainerMetrics:
    """The trainer process's metrics (its own registry and /metrics port)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tailstream_trainer_requests_total",
            "Fine-tune requests read from the training-requests topic (coalesced ones too).",
            registry=r)
        self.runs = Counter(
            "tailstream_finetune_runs_total",
            "Fine-tune runs by outcome: promoted, canary (the gate passed it to a canary), "
            "rejected, failed, skipped.",
            ["outcome"], registry=r)
        self.failures = Counter(
            "tailstream_finetune_failures_total",
            "Failed fine-tune runs by cause: nan_loss, cuda_oom, corrupt_checkpoint, "
            "redis_unavailable, error.",
            ["cause"], registry=r)
        self.duration = Histogram(
            "tailstream_finetune_duration_seconds",
            "Wall time of a fine-tune run (data, training, evaluation, checkpoint).",
            buckets=FINETUNE_BUCKETS, registry=r)
        self.pairs_per_s = Gauge(
            "tailstream_finetune_samples_per_second",
            "Training pairs (user context + item) per second in the last run.", registry=r)
        self.loss = Gauge(
            "tailstream_finetune_loss",
            "Mean unweighted cross-entropy of the outcome head per class in the last run.",
            ["event_class"], registry=r)
        self.running = Gauge(
            "tailstream_finetune_running",
            "1 while a fine-tune is running.", registry=r)
        self.version = Gauge(
            "tailstream_model_version_number",
            "The promoted (served) model version (v00012 → 12; 0 = base).", registry=r)
        self.decisions = Counter(
            "tailstream_promotion_decisions_total",
            "Promotion gate decisions by decision and reason code.",
            ["decision", "reason"], registry=r)
        self.decision_refreshes = Counter(
            "tailstream_trainer_decision_refreshes_total",
            "Rejected triggers whose window refitted the served version's decision "
            "thresholds (sent to the workers; weights unchanged).", registry=r)
        self.gate_metric = Gauge(
            "tailstream_gate_metric_ratio",
            "Held-out metrics of the current and the candidate model at the last gate.",
            ["model", "metric"], registry=r)
        self.last_promotion = Gauge(
            "tailstream_last_promotion_timestamp_seconds",
            "Unix time of the last promotion (0: none since the trainer started).", registry=r)
        self.paused_seconds = Counter(
            "tailstream_trainer_paused_seconds",
            "Seconds fine-tunes spent paused between steps because a worker was over its "
            "latency budget or its lag grew (back-pressure).", registry=r)
        self.pauses = Counter(
            "tailstream_trainer_pauses",
            "Pauses of fine-tunes between steps, by reason (latency, lag).", ["reason"],
            registry=r)
        self.unhelpful_pauses = Counter(
            "tailstream_trainer_unhelpful_pauses",
            "Pauses that ran to TAILSTREAM_TRAINER_PAUSE_MAX_S with the workers still over "
            "budget (with TAILSTREAM_TRAINER_MIN_DUTY > 0 each buys a run of steps).",
            registry=r)
        self.floor = Gauge(
            "tailstream_trainer_floor_seconds",
            "The workers' p99 measured at the end of a pause that ran to its bound over "
            "budget without lowering it (their latency without the trainer): until "
            "TAILSTREAM_TRAINER_FLOOR_TTL_S "
            "lapses the trainer pauses only over 1.2 x it (0: none standing).", registry=r)
        self.duty_seconds = Counter(
            "tailstream_trainer_duty_seconds",
            "Seconds of training owed after unhelpful pauses (no pause is asked for during "
            "them).", registry=r)
        self.paused = Gauge(
            "tailstream_trainer_paused",
            "1 while a fine-tune waits for the workers to get back under their budget.",
            registry=r)
        self._canary(r)
        self.rss = process_rss_gauge(r)

    def _canary(self, r: CollectorRegistry) -> None:
        """The canary before a promotion, and the online figures it is judged on (every
        worker's, read from Redis): by role, serving (the version in CURRENT), previous
        (the promotion before it) and canary (the candidate being tried)."""
        self.canaries = Counter(
            "tailstream_canaries",
            "Canaries by outcome: started (a candidate passed the offline gate and serves "
            "a share of users), promoted, rolled_back.", ["outcome"], registry=r)
        for outcome in ("started", "promoted", "rolled_back"):
            self.canaries.labels(outcome)
        self.canary_running = Gauge(
            "tailstream_canary_running", "1 while a canary is being served.", registry=r)
        self.canary_version = Gauge(
            "tailstream_canary_model_version_number",
            "The candidate being tried (v00012 → 12; 0: no canary).", registry=r)
        self.canary_z = Gauge(
            "tailstream_canary_z_score",
            "z of the last canary's one-sided two-proportion test, candidate against the "
            "serving version (negative: the candidate's online hit rate was lower).",
            registry=r)
        self.online_hit_rate = Gauge(
            "tailstream_online_hit_rate_ratio",
            "Online HitRate of served lists (judged lists whose next interaction was on one "
            "of their items), every worker's, by role: serving, previous, canary.",
            ["role"], registry=r)
        self.online_judged = Gauge(
            "tailstream_online_judged_lists",
            "Judged lists behind tailstream_online_hit_rate_ratio, by role.", ["role"],
            registry=r)
        self.online_ctr = Gauge(
            "tailstream_online_ctr_ratio",
            "Attributed clicks per impression (an item shown in a served list), by role.",
            ["role"], registry=r)
        self.online_cvr = Gauge(
            "tailstream_online_cvr_ratio",
            "Attributed purchases per attributed click, by role.", ["role"], registry=r)
        self.online_tail_conversions = Gauge(
            "tailstream_online_tail_conversion_share_ratio",
            "Tail items' share of the attributed purchases, by role.", ["role"], registry=r)


class StackMetrics:
    """``tailstream up``'s own metrics: how its children fare (its /metrics port is
    ``TAILSTREAM_STACK_PORT``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.restarts = Counter(
            "tailstream_stack_restarts_total",
            "Children that died and were restarted by tailstream up, by process.",
            ["process"], registry=r)
        self.up = Gauge(
            "tailstream_stack_child_up",
            "1 while a child of tailstream up runs, 0 while it waits for its restart.",
            ["process"], registry=r)
