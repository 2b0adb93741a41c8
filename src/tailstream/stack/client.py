"""What the command line does against a running stack: find it, check Redis once at start,
read a user's list, follow the recommendations topic, and manage model versions (list,
promote, roll back — announced to the workers)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from tailstream.contract import display_text
from tailstream.models.towers.store import ModelStore
from tailstream.settings import Secret, Settings

log = logging.getLogger("tailstream")


def with_running_stack(settings: Settings) -> Settings:
    """Fill endpoints from ``{data_dir}/stack.json`` written by a running ``tailstream up``."""
    if settings.kafka_bootstrap and settings.redis_url:
        return settings
    path = settings.data_dir / "stack.json"
    if path.exists():
        info = json.loads(path.read_text())
        settings = settings.replace(
            kafka_bootstrap=settings.kafka_bootstrap or info["kafka_bootstrap"],
            redis_url=settings.redis_url or Secret(info["redis_url"]),
        )
    if not settings.kafka_bootstrap:
        raise SystemExit("no broker: run `tailstream up` first, or set TAILSTREAM_KAFKA_BOOTSTRAP")
    return settings


def preflight_redis(settings: Settings) -> None:
    """Refuse to start with Redis credentials or ACL permissions that cannot work (a
    clear error now rather than a worker that silently runs without Redis). An
    unreachable Redis is not fatal: workers ride out Redis outages."""
    from tailstream.redis_io import RedisConfigError, check_redis

    if not settings.redis_url:
        return
    try:
        state = check_redis(settings.redis_url.reveal(), prefix=settings.redis_prefix)
    except RedisConfigError as exc:
        raise SystemExit(f"tailstream: {exc}") from None
    if state != "ok":
        log.warning("redis not reachable at start (%s); continuing, writes are retried", state)


def read_list(settings: Settings, user: str) -> dict[str, Any] | None:
    """A user's current list from Redis (asked with the id the caller knows)."""
    import redis

    from tailstream.privacy import pseudonymize
    from tailstream.redis_io import Keys
    from tailstream.streams.stores.publisher import parse_meta

    client = redis.Redis.from_url(settings.redis_url.reveal())
    try:
        stored = pseudonymize(user, settings.pseudonymize_key.reveal())
        return parse_meta(stored, client.hgetall(Keys(settings.redis_prefix).meta(stored)))
    finally:
        client.close()


class ListReader:
    """What a user is shown right now: the item ids of their list in Redis (one ``HGET``
    of the list's items, the id pseudonymized as the workers store it). For the synthetic
    shop's users, who sometimes take an item from their list; None when there is none or
    Redis does not answer (the shop then browses as usual)."""

    def __init__(self, settings: Settings) -> None:
        import redis

        from tailstream.redis_io import Keys

        self.client = redis.Redis.from_url(settings.redis_url.reveal(), socket_timeout=1,
                                           socket_connect_timeout=1)
        self.keys = Keys(settings.redis_prefix)
        self.key = settings.pseudonymize_key.reveal()
        self.reads = 0

    def __call__(self, user: str) -> list[str] | None:
        from redis.exceptions import RedisError

        from tailstream.privacy import pseudonymize

        self.reads += 1
        try:
            raw = self.client.hget(self.keys.meta(pseudonymize(user, self.key)), "items")
            return [str(it["item_id"]) for it in json.loads(raw)] if raw else None
        except (RedisError, OSError, ValueError, KeyError, TypeError):
            return None

    def close(self) -> None:
        self.client.close()


def follow_lists(settings: Settings, *, user: str | None, from_beginning: bool,
                 as_json: bool, limit: int) -> None:
    """Print lists from the recommendations topic as they come (one line each)."""
    from tailstream.kafka_io import iter_messages, reader

    consumer = reader(settings, [settings.topic(settings.topic_recommendations)],
                      from_beginning=from_beginning)
    shown = 0
    try:
        for record in iter_messages(consumer):
            if user and record.key != user.encode():
                continue
            msg = json.loads(record.value)
            print(json.dumps(msg) if as_json else list_line(msg), flush=True)
            shown += 1
            if limit and shown >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def list_line(msg: dict[str, Any]) -> str:
    """One recommendation message as a line: user, version, trigger, first items (tier).

    >>> list_line({"user_id": "u1", "model_version": "v00002", "trigger": "event",
    ...            "items": [{"item_id": "i9", "tier": "tail"}]})
    '          u1 [v00002, event] i9(t)'
    """
    items = ", ".join(f"{display_text(str(it['item_id']), 40)}({it['tier'][0]})"
                      for it in msg["items"][:8])
    return (f"{display_text(str(msg['user_id']), 40):>12} [{msg['model_version']}, "
            f"{msg['trigger']}] {items}")


# --------------------------------------------------------------------------- model versions
def print_versions(store: ModelStore, as_json: bool,
                   online: dict[str, dict[str, Any]] | None = None) -> None:
    """Every version with its offline (gate) figures and, beside them, its online ones:
    ``online`` (every worker's, read from Redis now) or, without it, what the manifest
    recorded when its canary ended."""
    current = store.current()
    rows = store.versions()
    online = online or {}
    if as_json:
        print(json.dumps({"current": current, "versions": rows, "online": online}, indent=2,
                         default=str))
        return
    print(f"serving: {current}   (store: {store.root})")
    for label, figures in sorted(online.items()):
        if label.startswith("base-"):  # lists of the untrained base model
            print(f"{'base':>7}  {'':<11} {label:<38} {online_text(figures)}")
    for line in version_lines(rows, online):
        print(line)


def online_text(figures: dict[str, Any] | None) -> str:
    """A version's online figures in a few words.

    >>> online_text({"hit_rate": 0.3125, "judged": 1204, "lists": 3000, "ctr": 0.21,
    ...              "cvr": 0.05})
    'online hit 0.312 of 1,204 judged, 3,000 lists, ctr 0.210, cvr 0.050'
    >>> online_text(None)
    'online —'
    """
    if not figures or not figures.get("lists"):
        return "online —"
    hit = figures.get("hit_rate")
    ctr, cvr = figures.get("ctr"), figures.get("cvr")
    return (f"online hit {'—' if hit is None else f'{hit:.3f}'} of "
            f"{figures.get('judged', 0):,} judged, {figures.get('lists', 0):,} lists, "
            f"ctr {'—' if ctr is None else f'{ctr:.3f}'}, "
            f"cvr {'—' if cvr is None else f'{cvr:.3f}'}")


def version_lines(rows: Iterable[dict[str, Any]],
                  online: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """A line per version: status, parent, policy, the gate's held-out figures, the
    online figures beside them (live, else the canary's candidate arm), and the reason."""
    out = []
    for m in rows:
        cand = m.get("metrics", {}).get("candidate", {})
        live = (online or {}).get(m["version"])
        if live is None:
            live = m.get("canary", {}).get("online", {}).get("candidate")
        out.append(f"{m['version']:>7}  {m.get('status', '?'):<11} parent "
                   f"{m.get('parent', '?'):<7} {m.get('policy', {}).get('policy', '?'):<15}"
                   f" recall cart {cand.get('recall_cart', 0):.3f}"
                   f" purchase {cand.get('recall_purchase', 0):.3f}"
                   f" hit@10 {cand.get('hit_at_10', 0):.3f} | {online_text(live)}"
                   f"  {m.get('reason', '')}")
    return out


def read_online_figures(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every version's online figures from Redis (every worker's), when Redis is known and
    answers within a second or two; {} otherwise (the list shows the manifests' figures)."""
    try:
        settings = with_running_stack(settings)
    except SystemExit:
        pass
    if not settings.redis_url:
        return {}
    import redis

    from tailstream.streams.stores.impressions import read_online

    client = redis.Redis.from_url(settings.redis_url.reveal(), socket_timeout=2,
                                  socket_connect_timeout=1)
    try:
        return {v: f.to_dict() for v, f in read_online(client, settings.redis_prefix).items()}
    except (redis.RedisError, OSError) as exc:
        log.warning("online figures unavailable (%s): showing the manifests' only", exc)
        return {}
    finally:
        client.close()


def change_version(settings: Settings, action: str, version: str | None,
                   reason: str | None) -> None:
    """Promote ``version`` or roll back, then tell the running workers."""
    store = ModelStore(settings.model_store_dir)
    if action == "promote":
        if not version:
            raise SystemExit("model promote needs a VERSION")
        entry = store.promote(version, reason or "manual promotion")
    else:
        entry = store.rollback(reason or "manual rollback")
    print(f"{entry['action']}: now serving {entry['version']} (was {entry['previous']})")
    announce(settings, {"version": entry["version"], "action": entry["action"],
                        "reason": entry["reason"], "promoted_at": entry["at"]})


def announce(settings: Settings, update: dict[str, Any]) -> None:
    """Tell running workers about a manual promote/rollback (they also read the store's
    CURRENT pointer at start, so a stack that is down learns it then)."""
    try:
        settings = with_running_stack(settings)
    except SystemExit:
        print("no broker known: workers pick the change up when they start")
        return
    from tailstream.producers.sender import make_producer

    producer = make_producer(settings)
    try:
        producer.send(settings.topic(settings.topic_model_updates), key=b"model",
                      value=json.dumps(update).encode())
        producer.flush(10)
    finally:
        producer.close()
    print("announced on", settings.topic(settings.topic_model_updates), file=sys.stdout)
